//! The mesh registry file of `ztunnel ca serve`: which workload (identity)
//! runs on which node. Node authorization is read from it; it is the same
//! list of workloads node configuration files carry, each with its `node`.

use std::path::Path;

use serde::Deserialize;

use super::{ConfigError, Invalid, Step, WorkloadConfig, parse_yaml};
use crate::identity::spiffe::{TrustDomain, validate_segment};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryFile {
    #[serde(default)]
    pub trust_domain: TrustDomain,
    pub workloads: Vec<WorkloadConfig>,
}

impl RegistryFile {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, file: &Path) -> Result<Self, ConfigError> {
        let registry: RegistryFile = parse_yaml(text, file)?;
        for (i, w) in registry.workloads.iter().enumerate() {
            let at =
                |field: &str| vec![Step::Key("workloads".into()), Step::Index(i), Step::Key(field.into())];
            if w.node.is_none() {
                let path = vec![Step::Key("workloads".into()), Step::Index(i)];
                return Err(Invalid::at(path, format!("workload `{}` needs `node` in the registry", w.name))
                    .into_error(text, file));
            }
            validate_segment("namespace", &w.namespace)
                .map_err(|e| Invalid::at(at("namespace"), e.to_string()).into_error(text, file))?;
            validate_segment("service account", &w.service_account)
                .map_err(|e| Invalid::at(at("service_account"), e.to_string()).into_error(text, file))?;
        }
        Ok(registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_workload_needs_a_node() {
        let err =
            RegistryFile::parse("workloads:\n  - name: a\n    node: n1\n  - name: b\n", Path::new("r.yaml"))
                .unwrap_err()
                .to_string();
        assert!(err.starts_with("r.yaml:4:"), "{err}");
        assert!(err.contains("workload `b` needs `node`"), "{err}");
    }
}
