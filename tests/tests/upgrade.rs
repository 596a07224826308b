//! Upgrading the tunnel without resets, over the real testbed: a second
//! `ztunnel run` on the same node takes the first one's listening sockets
//! (SCM_RIGHTS), the first stops accepting, drains what it carries and exits.

use std::{collections::BTreeMap, time::Duration};

use anyhow::Context as _;
use ztunnel::capture::MAP_ABI_VERSION;
use ztunnel_testbed::{
    Testbed, Tunnel,
    agent::{self, Server, Steady, Streams},
};

/// 50 long-lived connections stream through both nodes' tunnels while each
/// node's tunnel is replaced in turn, and a client opens a new connection
/// every 20 ms throughout. Nothing may fail: every stream's bytes come back
/// intact, every new connection is served, none reaches the destination
/// outside the tunnel, and both old processes exit on their own once their
/// connections end. The same steady client sees the refusals of an upgrade
/// by restart (capture.rs: `an_upgrade_by_restart_fails_closed_...`), so an
/// empty failure list here is not a client that cannot see failures.
#[test]
fn an_upgrade_by_handover_resets_nothing_and_refuses_nothing() -> anyhow::Result<()> {
    let mut tb = Testbed::new("handover")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let web = tb.add_pod(&n1, "web")?;
    let db = tb.add_pod(&n2, "db")?;
    let _server = Server::start(&tb, &db.place(), &[db.addr4(5432)])?;
    let _echo = Server::echo(&tb, &db.place(), &[db.addr4(7000)])?;
    // Long enough for the streams to outlive both handovers and end by
    // themselves before the old processes' drain deadline.
    let with_drain = |mut config: serde_json::Value| {
        config["proxy"]["drain_timeout"] = "60s".into();
        config
    };
    let mut t1 = tb.start_tunnel(&n1, with_drain(tb.tunnel_config(&n1, &[&web])))?;
    let mut t2 = tb.start_tunnel(&n2, with_drain(tb.tunnel_config(&n2, &[&db])))?;
    assert_eq!(agent::connect(&tb, &web.place(), db.addr4(5432), 1, 1)?.ok, 1);
    let refused_before = t1.capture_counter("refused_not_ready")?;

    let streams = Streams::start(&tb, &web.place(), db.addr4(7000), 50, Duration::from_secs(15))?;
    let interval = Duration::from_millis(20);
    let steady = Steady::start(&tb, &web.place(), db.addr4(5432), interval, Duration::from_secs(120))?;
    std::thread::sleep(Duration::from_secs(3));

    let limit = Duration::from_secs(60);
    let source_side = t1.upgrade(limit)?;
    std::thread::sleep(Duration::from_secs(2));
    let destination_side = t2.upgrade(limit)?;
    eprintln!(
        "upgrade by handover: source node {} ms, destination node {} ms from start to taken over",
        source_side.as_millis(),
        destination_side.as_millis()
    );

    let streamed = streams.finish()?;
    assert_eq!(streamed["ok"], 50, "long-lived connections failed across the handovers: {streamed}");
    assert!(streamed["bytes"].as_u64().unwrap_or(0) > 50 * 4096 * 100, "{streamed}");
    // The old processes exit by themselves once what they carried has ended.
    for (name, t) in [("n1", &mut t1), ("n2", &mut t2)] {
        let exits = t.wait_drained(Duration::from_secs(60))?;
        assert_eq!(exits.len(), 1, "{name}");
        assert!(exits[0].success(), "{name}'s old tunnel exited with {}", exits[0]);
    }
    std::thread::sleep(Duration::from_secs(1));
    let report = steady.stop()?;
    let attempts = report["attempts"].as_u64().unwrap_or(0);
    eprintln!("upgrade by handover: {attempts} new connections one every {} ms", interval.as_millis());
    assert!(attempts > 300, "{report}");
    if report["ok"].as_u64() != Some(attempts) {
        panic!(
            "a new connection failed during the handovers: {report}\n{}",
            failed_lines(&[("n1", &t1), ("n2", &t2)])
        );
    }

    // Nothing was refused for want of a tunnel, and nothing reached db
    // outside one: every call db received came over mTLS, through one
    // process or the other.
    assert_eq!(t1.capture_counter("refused_not_ready")?, refused_before);
    t2.flush_access_log()?;
    let inbound: Vec<_> = t2.access_log().into_iter().filter(|e| e["direction"] == "inbound").collect();
    assert!(inbound.len() as u64 > attempts, "{} inbound lines", inbound.len());
    let outside: Vec<_> = inbound.iter().filter(|e| e["mode"] != "hbone" || e["reason"] != "ok").collect();
    assert!(outside.is_empty(), "calls that reached db outside mTLS or failed: {outside:?}");
    for (name, t) in [("n1", &t1), ("n2", &t2)] {
        assert!(t.log().contains("handed over: no longer accepting"), "{name}: {}", t.log_tail(30));
    }
    // The new tunnels serve on their own.
    assert_eq!(agent::connect(&tb, &web.place(), db.addr4(5432), 5, 1)?.ok, 5);
    Ok(())
}

/// How a systemd unit upgrades: `systemctl kill -s SIGUSR2` makes the
/// running tunnel start its own binary again as its successor; the new
/// process takes over as above, the old one tells systemd (sd_notify) that
/// the new one is the unit's main process, drains and exits. systemd cannot
/// run here: a datagram socket named by `NOTIFY_SOCKET` stands in for it and
/// receives exactly what systemd would.
#[test]
fn sigusr2_starts_a_successor_that_takes_over_and_becomes_the_main_pid() -> anyhow::Result<()> {
    // The successor is the old tunnel's child: when the old one exits, this
    // process adopts (and finally reaps) it.
    nix::sys::prctl::set_child_subreaper(true)?;
    let mut tb = Testbed::new("sigusr2")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let web = tb.add_pod(&n1, "web")?;
    let db = tb.add_pod(&n2, "db")?;
    let _server = Server::start(&tb, &db.place(), &[db.addr4(5432)])?;
    let notify_path = tb.dir().join("notify");
    let systemd = std::os::unix::net::UnixDatagram::bind(&notify_path)?;
    systemd.set_read_timeout(Some(Duration::from_secs(60)))?;
    let env = [("NOTIFY_SOCKET".to_owned(), notify_path.display().to_string())];
    let mut t1 = Tunnel::start_with_env(&tb, &n1, tb.tunnel_config(&n1, &[&web]), &[], &env)?;
    let _t2 = tb.start_tunnel(&n2, tb.tunnel_config(&n2, &[&db]))?;
    let next = || -> anyhow::Result<String> {
        let mut buf = [0u8; 256];
        let n = systemd.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    };
    assert_eq!(next()?, "READY=1", "the tunnel says ready once it is");
    let old = t1.pid().context("running")?;

    let interval = Duration::from_millis(20);
    let steady = Steady::start(&tb, &web.place(), db.addr4(5432), interval, Duration::from_secs(120))?;
    std::thread::sleep(Duration::from_secs(2));
    let started = std::time::Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(old as i32), nix::sys::signal::Signal::SIGUSR2)?;
    // The successor says ready too (harmless to systemd: the unit is active
    // already); then the old one names it the main process.
    let main_pid = loop {
        let state =
            next().with_context(|| format!("no MAINPID from the old tunnel:\n{}", t1.log_tail(30)))?;
        if let Some(pid) = state.strip_prefix("MAINPID=") {
            break pid.parse::<u32>()?;
        }
        assert_eq!(state, "READY=1", "unexpected notification");
    };
    eprintln!("upgrade by SIGUSR2: {} ms from the signal to MAINPID", started.elapsed().as_millis());
    assert_ne!(main_pid, old);
    t1.adopt(main_pid);
    let exits = t1.wait_drained(Duration::from_secs(30))?;
    assert!(exits.iter().all(std::process::ExitStatus::success), "{exits:?}");
    std::thread::sleep(Duration::from_secs(1));
    let report = steady.stop()?;
    let attempts = report["attempts"].as_u64().unwrap_or(0);
    assert!(attempts > 100, "{report}");
    assert_eq!(report["ok"].as_u64(), Some(attempts), "a new connection failed during the upgrade: {report}");
    // The main pid systemd was told is the process serving now.
    assert_eq!(t1.config_dump()?["pid"].as_u64(), Some(u64::from(main_pid)));
    assert_eq!(agent::connect(&tb, &web.place(), db.addr4(5432), 3, 1)?.ok, 3);
    Ok(())
}

/// A new tunnel process swaps its eBPF programs into the links the running
/// one pinned. Attaching a second link and then unpinning the first would run
/// both programs for a moment: a connect() the first one redirected to the
/// tunnel is seen by the second as a call to the tunnel's own port and
/// refused (EPERM), and a socket created then is counted twice against its
/// workload's quota. Clients connecting back to back through six upgrades
/// must see none of it. (With a new link attached before the old one was
/// unpinned, this saw a refused connect() in about every other run.)
#[test]
fn swapping_the_capture_programs_refuses_no_connect() -> anyhow::Result<()> {
    let mut tb = Testbed::new("swapprog")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let web = tb.add_pod(&n1, "web")?;
    let db = tb.add_pod(&n2, "db")?;
    let _server = Server::start(&tb, &db.place(), &[db.addr4(5432)])?;
    let mut t1 = tb.start_tunnel(&n1, tb.tunnel_config(&n1, &[&web]))?;
    let _t2 = tb.start_tunnel(&n2, tb.tunnel_config(&n2, &[&db]))?;
    assert_eq!(agent::connect(&tb, &web.place(), db.addr4(5432), 1, 1)?.ok, 1);
    let before = |t: &Tunnel| -> anyhow::Result<u64> { t.capture_counter("self_call") };
    let self_calls = before(&t1)?;

    // Back to back: the next connect() starts as soon as the last exchange
    // ends, so one of them is in flight almost all the time.
    let clients = (0..4)
        .map(|_| {
            Steady::start(
                &tb,
                &web.place(),
                db.addr4(5432),
                Duration::from_millis(1),
                Duration::from_secs(120),
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let links_dir = tb.pin_base.join(&n1.name).join(format!("v{MAP_ABI_VERSION}/links"));
    let links_before = pinned_links(&links_dir)?;
    std::thread::sleep(Duration::from_secs(1));
    for _ in 0..6 {
        t1.upgrade(Duration::from_secs(60))?;
        t1.wait_drained(Duration::from_secs(30))?;
    }
    // The same links (ids) carry new programs: swapped, not attached anew.
    let links_after = pinned_links(&links_dir)?;
    assert_eq!(
        links_before.keys().collect::<Vec<_>>(),
        links_after.keys().collect::<Vec<_>>(),
        "the pinned links"
    );
    assert!(links_before.len() >= 7, "cgroup, delivery and sk_lookup links: {links_before:?}");
    for (pin, (link, program)) in &links_before {
        let (link_after, program_after) = links_after[pin];
        assert_eq!(*link, link_after, "{pin} is another link after the upgrades:\n{}", t1.log_tail(200));
        assert_ne!(*program, program_after, "{pin} still runs the first tunnel's program");
    }
    let mut attempts = 0;
    for client in clients {
        let report = client.stop()?;
        attempts += report["attempts"].as_u64().unwrap_or(0);
        assert_eq!(
            report["ok"],
            report["attempts"],
            "a connect() failed while the programs were swapped: {report}\n{}",
            t1.log_tail(20)
        );
    }
    eprintln!("program swap: {attempts} connections through six upgrades, none refused");
    assert!(attempts > 600, "too few connections to cover the swaps: {attempts}");
    assert_eq!(t1.capture_counter("self_call")?, self_calls);
    Ok(())
}

/// A would-be successor swaps its programs into the pinned links as it
/// starts; if it then dies before taking over, the tunnel that carries on
/// puts its own back, so the links never run the programs of a process that
/// is gone (an upgrade's new build, perhaps the reason it failed). The
/// successor is held back by a CA outage (it takes over only once its
/// workloads hold certificates) and killed while it waits.
#[test]
fn a_successor_that_dies_before_taking_over_leaves_the_links_to_the_running_tunnel() -> anyhow::Result<()> {
    let mut tb = Testbed::new("deadsucc")?;
    let n1 = tb.add_node("n1")?;
    let n2 = tb.add_node("n2")?;
    let web = tb.add_pod(&n1, "web")?;
    let db = tb.add_pod(&n2, "db")?;
    let _server = Server::start(&tb, &db.place(), &[db.addr4(5432)])?;
    let mut ca = tb.start_ca(&n1, &[])?;
    let mut config = tb.tunnel_config(&n1, &[&web]);
    tb.use_remote_ca(&mut config, &ca, &n1)?;
    let t1 = tb.start_tunnel(&n1, config)?;
    let _t2 = tb.start_tunnel(&n2, tb.tunnel_config(&n2, &[&db]))?;
    assert_eq!(agent::connect(&tb, &web.place(), db.addr4(5432), 1, 1)?.ok, 1);
    let links_dir = tb.pin_base.join(&n1.name).join(format!("v{MAP_ABI_VERSION}/links"));
    let ours = pinned_links(&links_dir)?;
    assert!(ours.len() >= 7, "cgroup, delivery and sk_lookup links: {ours:?}");

    ca.stop();
    let mut successor = t1.start_successor()?;
    // First see the successor's programs in every link: what a tunnel that
    // did not take them back would be left with.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let now = pinned_links(&links_dir)?;
        if ours.iter().all(|(pin, (_, program))| now.get(pin).is_some_and(|(_, p)| p != program)) {
            break;
        }
        if let Some(status) = successor.try_wait()? {
            anyhow::bail!(
                "the successor exited ({status}) before swapping its programs in:\n{}",
                t1.log_tail(40)
            );
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the successor's programs never reached every link: {now:?} (ours: {ours:?})\n{}",
            t1.log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!t1.log().contains("took over from the tunnel"), "it took over already:\n{}", t1.log_tail(40));
    successor.kill()?;
    successor.wait()?;

    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !t1.log().contains("the new tunnel did not take over, carrying on") {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no handover failure seen:\n{}",
            t1.log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = pinned_links(&links_dir)?;
    assert_eq!(after, ours, "the same links, running this tunnel's programs again:\n{}", t1.log_tail(40));
    assert_eq!(agent::connect(&tb, &web.place(), db.addr4(5432), 5, 1)?.ok, 5);
    Ok(())
}

/// For a failure message: the access log lines of connections that did not
/// end `ok`, and the end of each tunnel's log.
fn failed_lines(tunnels: &[(&str, &Tunnel)]) -> String {
    let mut out = String::new();
    for (name, t) in tunnels {
        let _ = t.flush_access_log();
        for line in t.access_log().into_iter().filter(|e| e["reason"] != "ok") {
            out.push_str(&format!("{name} access log: {line}\n"));
        }
        out.push_str(&format!("{name} log:\n{}\n", t.log_tail(60)));
    }
    out
}

/// Every link pinned below `dir`: its path (relative), link id and program id.
fn pinned_links(dir: &std::path::Path) -> anyhow::Result<BTreeMap<String, (u64, u64)>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("{}", d.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let shown = std::process::Command::new("bpftool")
                .args(["-j", "link", "show", "pinned"])
                .arg(&path)
                .output()?;
            anyhow::ensure!(shown.status.success(), "bpftool: {}", String::from_utf8_lossy(&shown.stderr));
            let link: serde_json::Value = serde_json::from_slice(&shown.stdout)?;
            let ids = (link["id"].as_u64().unwrap_or(0), link["prog_id"].as_u64().unwrap_or(0));
            out.insert(path.strip_prefix(dir)?.display().to_string(), ids);
        }
    }
    Ok(out)
}
