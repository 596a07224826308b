//! `ztunnel-cni`: with no arguments, the CNI plugin (the runtime's
//! `CNI_COMMAND` environment and stdin); with a subcommand, its install into
//! or removal from the node's CNI configuration.

use std::io::Read as _;

use ztunnel_cni::{config::PluginConfig, logging, plugin, spec::CniEnv};

fn main() {
    std::process::exit(run_plugin());
}

fn run_plugin() -> i32 {
    let mut stdin = String::new();
    // An unreadable stdin is an empty configuration: the command's own
    // checks then say what is missing.
    let _ = std::io::stdin().read_to_string(&mut stdin);
    let config = PluginConfig::parse(&stdin);
    match &config {
        Ok(c) => logging::init(&c.log_level, c.log_file.as_deref()),
        Err(_) => logging::init(ztunnel_cni::config::DEFAULT_LOG_LEVEL, None),
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let exit = plugin::run(&CniEnv::from_process(), &stdin, config);
    print!("{}", exit.stdout);
    exit.code
}
