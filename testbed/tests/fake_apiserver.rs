//! The fake API server, driven by the client ztunnel uses (kube-rs): typed
//! resources, the policy custom resource, watchers and reflectors through
//! stream cuts, restarts and compaction, TokenReview. No root needed.

use std::{
    collections::{BTreeMap, HashSet},
    future::Future,
    io::{Read as _, Write as _},
    net::TcpStream,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Client, Config,
    api::{
        Api, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams, WatchEvent,
        WatchParams,
    },
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, reflector, watcher, watcher::Event},
};
use serde_json::{Value, json};
use ztunnel_testbed::kube::{API_AUDIENCE, FakeApiServer, Options, TokenInfo};

/// Long enough for a loaded 2-core machine; every wait ends as soon as it can.
const PATIENCE: Duration = Duration::from_secs(30);

struct Fixture {
    server: FakeApiServer,
    kubeconfig: PathBuf,
    _dir: tempfile::TempDir,
}

fn fixture(options: Options) -> Fixture {
    let server = FakeApiServer::start_with(options).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).unwrap();
    Fixture { server, kubeconfig, _dir: dir }
}

/// Options for tests: bookmarks every 200 ms.
fn quick() -> Options {
    Options { bookmark_interval: Duration::from_millis(200), ..Options::default() }
}

fn run<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
}

/// A client made the way ztunnel makes one: from a kubeconfig file.
async fn client(f: &Fixture) -> Client {
    let kubeconfig = Kubeconfig::read_from(&f.kubeconfig).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.unwrap();
    Client::try_from(config).unwrap()
}

async fn next<S: Stream + Unpin>(s: &mut S) -> S::Item {
    tokio::time::timeout(PATIENCE, s.next())
        .await
        .expect("no event within the patience")
        .expect("stream ended")
}

/// Polls `f` until it holds; false if it never did within the patience.
async fn eventually(mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

fn namespace(f: &Fixture, name: &str) {
    f.server.create("namespaces", "", json!({ "metadata": { "name": name } })).unwrap();
}

fn pod(ns: &str, name: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "namespace": ns, "labels": labels },
        "spec": { "nodeName": "n1", "serviceAccountName": name, "containers": [{ "name": "app", "image": "app" }] },
    })
}

fn name_of<K: kube::Resource>(o: &K) -> String {
    o.meta().name.clone().unwrap_or_default()
}

/// The server's pods as `namespace/name -> resourceVersion`.
fn server_pods(f: &Fixture) -> BTreeMap<String, String> {
    f.server
        .list("pods", "")
        .unwrap()
        .iter()
        .map(|p| {
            let m = &p["metadata"];
            (
                format!("{}/{}", m["namespace"].as_str().unwrap(), m["name"].as_str().unwrap()),
                m["resourceVersion"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn reflected_pods(reader: &reflector::Store<Pod>) -> BTreeMap<String, String> {
    reader
        .state()
        .iter()
        .map(|p| {
            (
                format!("{}/{}", p.metadata.namespace.clone().unwrap_or_default(), name_of(p.as_ref())),
                p.metadata.resource_version.clone().unwrap_or_default(),
            )
        })
        .collect()
}

/// One plain HTTP/1.1 request: (status, JSON body).
fn raw(f: &Fixture, method: &str, path: &str, token: Option<&str>, body: Option<&Value>) -> (u16, Value) {
    let mut s = TcpStream::connect(f.server.addr()).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let body = body.map(Value::to_string).unwrap_or_default();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: fake\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).unwrap_or(Value::String(body.to_owned())))
}

#[test]
fn typed_watchers_see_the_initial_list_then_added_modified_deleted() {
    let f = fixture(quick());
    namespace(&f, "a");
    f.server.create("pods", "a", pod("a", "p1", json!({ "app": "web" }))).unwrap();
    f.server.create("pods", "a", pod("a", "p2", json!({ "app": "db" }))).unwrap();
    run(async {
        let pods: Api<Pod> = Api::all(client(&f).await);
        let listed = pods.list(&ListParams::default()).await.unwrap();
        assert_eq!(listed.items.iter().map(name_of).collect::<Vec<_>>(), ["p1", "p2"]);
        assert_eq!(listed.metadata.resource_version, Some(f.server.resource_version().to_string()));

        let mut w = watcher(pods.clone(), watcher::Config::default()).boxed();
        assert!(matches!(next(&mut w).await.unwrap(), Event::Init));
        let mut initial = Vec::new();
        loop {
            match next(&mut w).await.unwrap() {
                Event::InitApply(p) => initial.push(name_of(&p)),
                Event::InitDone => break,
                e => panic!("unexpected {e:?}"),
            }
        }
        assert_eq!(initial, ["p1", "p2"]);

        f.server.create("pods", "a", pod("a", "p3", json!({}))).unwrap();
        let Event::Apply(p3) = next(&mut w).await.unwrap() else { panic!("p3 not applied") };
        assert_eq!(name_of(&p3), "p3");
        assert!(p3.metadata.uid.is_some() && p3.metadata.creation_timestamp.is_some());

        f.server
            .merge_patch("pods", "a", "p1", json!({ "metadata": { "labels": { "tier": "front" } } }))
            .unwrap();
        let Event::Apply(p1) = next(&mut w).await.unwrap() else { panic!("p1 not modified") };
        assert_eq!(p1.metadata.labels.unwrap()["tier"], "front");

        let gone = f.server.delete("pods", "a", "p2").unwrap();
        let Event::Delete(p2) = next(&mut w).await.unwrap() else { panic!("p2 not deleted") };
        assert_eq!(name_of(&p2), "p2");
        assert_eq!(p2.metadata.resource_version.as_deref(), gone["metadata"]["resourceVersion"].as_str());
        // The deletion's resourceVersion is the newest: the object carries it.
        assert_eq!(gone["metadata"]["resourceVersion"], f.server.resource_version().to_string());
    });
}

#[test]
fn namespaces_services_endpointslices_and_the_policy_resource_work_through_kube() {
    let f = fixture(quick());
    run(async {
        let c = client(&f).await;
        let namespaces: Api<Namespace> = Api::all(c.clone());
        let ns: Namespace = serde_json::from_value(json!({
            "metadata": { "name": "shop", "labels": { "ztunnel.dev/dataplane": "enabled" } }
        }))
        .unwrap();
        let created = namespaces.create(&PostParams::default(), &ns).await.unwrap();
        assert_eq!(created.status.unwrap().phase.as_deref(), Some("Active"));

        let services: Api<Service> = Api::namespaced(c.clone(), "shop");
        let svc: Service = serde_json::from_value(json!({
            "metadata": { "name": "web" },
            "spec": { "selector": { "app": "web" }, "ports": [{ "port": 80, "targetPort": 8080 }] }
        }))
        .unwrap();
        let svc = services.create(&PostParams::default(), &svc).await.unwrap();
        let ip = svc.spec.unwrap().cluster_ip.unwrap();
        assert!(ip.starts_with("198.18."), "ClusterIP {ip} from the testbed's range");

        let slices: Api<EndpointSlice> = Api::namespaced(c.clone(), "shop");
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": { "name": "web-abc", "labels": { "kubernetes.io/service-name": "web" } },
            "addressType": "IPv4",
            "endpoints": [{ "addresses": ["198.19.1.11"], "conditions": { "ready": true } }],
            "ports": [{ "port": 8080 }]
        }))
        .unwrap();
        slices.create(&PostParams::default(), &slice).await.unwrap();
        let found =
            slices.list(&ListParams::default().labels("kubernetes.io/service-name=web")).await.unwrap();
        assert_eq!(found.items.len(), 1);

        // The custom resource, found through discovery as ztunnel would.
        let gvk = GroupVersionKind::gvk("security.ztunnel.dev", "v1", "AuthorizationPolicy");
        let (ar, _caps) = kube::discovery::pinned_kind(&c, &gvk).await.unwrap();
        assert_eq!(ar.plural, "authorizationpolicies");
        let policies: Api<DynamicObject> = Api::namespaced_with(c.clone(), "shop", &ar);
        let mut w = watcher(policies.clone(), watcher::Config::default()).boxed();
        while !matches!(next(&mut w).await.unwrap(), Event::InitDone) {}
        let policy = DynamicObject::new("allow-web", &ar).data(json!({
            "spec": { "selector": { "matchLabels": { "app": "web" } }, "action": "ALLOW",
                      "rules": [{ "from": [{ "source": { "principals": ["cluster.local/ns/shop/sa/client"] } }] }] }
        }));
        policies.create(&PostParams::default(), &policy).await.unwrap();
        let Event::Apply(seen) = next(&mut w).await.unwrap() else { panic!("policy not applied") };
        assert_eq!(seen.data["spec"]["action"], "ALLOW");
        let patch = json!({ "spec": { "action": "DENY" } });
        policies.patch("allow-web", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
        let Event::Apply(seen) = next(&mut w).await.unwrap() else { panic!("policy not modified") };
        assert_eq!(seen.data["spec"]["action"], "DENY");
        assert_eq!(seen.metadata.generation, Some(2));
        policies.delete("allow-web", &Default::default()).await.unwrap();
        assert!(matches!(next(&mut w).await.unwrap(), Event::Delete(_)));

        // The status subresource, as a kubelet writes it.
        namespace(&f, "shop-pods");
        f.server.create("pods", "shop-pods", pod("shop-pods", "web-1", json!({ "app": "web" }))).unwrap();
        let pods: Api<Pod> = Api::namespaced(c.clone(), "shop-pods");
        let status = json!({ "status": { "phase": "Running", "podIP": "198.19.1.11" }, "spec": { "nodeName": "elsewhere" } });
        let running =
            pods.patch_status("web-1", &PatchParams::default(), &Patch::Merge(&status)).await.unwrap();
        let (spec, st) = (running.spec.unwrap(), running.status.unwrap());
        assert_eq!((st.phase.as_deref(), st.pod_ip.as_deref()), (Some("Running"), Some("198.19.1.11")));
        assert_eq!(spec.node_name.as_deref(), Some("n1"), "/status changes only the status");
        let running_on_n1 =
            pods.list(&ListParams::default().fields("status.phase=Running,spec.nodeName=n1")).await.unwrap();
        assert_eq!(running_on_n1.items.len(), 1);
        // A replace from a stale read conflicts.
        let mut stale = pods.get("web-1").await.unwrap();
        pods.patch(
            "web-1",
            &PatchParams::default(),
            &Patch::Merge(&json!({ "metadata": { "labels": { "v": "2" } } })),
        )
        .await
        .unwrap();
        stale.metadata.labels = Some([("v".to_owned(), "3".to_owned())].into());
        let kube::Error::Api(conflict) =
            pods.replace("web-1", &PostParams::default(), &stale).await.unwrap_err()
        else {
            panic!("not an API error")
        };
        assert_eq!((conflict.code, conflict.reason.as_str()), (409, "Conflict"));

        // Errors are Status objects with the real reasons.
        let kube::Error::Api(dup) =
            services.create(&PostParams::default(), &svc_named("web")).await.unwrap_err()
        else {
            panic!("not an API error")
        };
        assert_eq!((dup.code, dup.reason.as_str()), (409, "AlreadyExists"));
        let kube::Error::Api(missing) = services.get("nope").await.unwrap_err() else {
            panic!("not an API error")
        };
        assert_eq!(
            (missing.code, missing.reason.as_str(), missing.message.as_str()),
            (404, "NotFound", "services \"nope\" not found")
        );
        let elsewhere: Api<Service> = Api::namespaced(c.clone(), "no-such-namespace");
        let kube::Error::Api(no_ns) =
            elsewhere.create(&PostParams::default(), &svc_named("x")).await.unwrap_err()
        else {
            panic!("not an API error")
        };
        assert_eq!((no_ns.code, no_ns.message.as_str()), (404, "namespaces \"no-such-namespace\" not found"));
    });
}

fn svc_named(name: &str) -> Service {
    serde_json::from_value(json!({ "metadata": { "name": name }, "spec": { "ports": [{ "port": 80 }] } }))
        .unwrap()
}

#[test]
fn a_relabel_makes_a_label_selected_watcher_see_a_delete() {
    let f = fixture(quick());
    namespace(&f, "a");
    f.server.create("pods", "a", pod("a", "p1", json!({ "app": "web" }))).unwrap();
    f.server.create("pods", "a", pod("a", "p2", json!({ "app": "db" }))).unwrap();
    run(async {
        let pods: Api<Pod> = Api::namespaced(client(&f).await, "a");
        let mut w = watcher(pods, watcher::Config::default().labels("app=web")).boxed();
        let mut initial = Vec::new();
        loop {
            match next(&mut w).await.unwrap() {
                Event::InitApply(p) => initial.push(name_of(&p)),
                Event::InitDone => break,
                _ => {}
            }
        }
        assert_eq!(initial, ["p1"]);
        f.server
            .merge_patch("pods", "a", "p1", json!({ "metadata": { "labels": { "app": "db" } } }))
            .unwrap();
        let Event::Delete(p1) = next(&mut w).await.unwrap() else {
            panic!("p1 leaving the selector is no delete")
        };
        assert_eq!(p1.metadata.labels.unwrap()["app"], "db", "the DELETED event carries the new state");
        f.server
            .merge_patch("pods", "a", "p2", json!({ "metadata": { "labels": { "app": "web" } } }))
            .unwrap();
        let Event::Apply(p2) = next(&mut w).await.unwrap() else {
            panic!("p2 entering the selector is no add")
        };
        assert_eq!(name_of(&p2), "p2");
    });
}

#[test]
fn field_selectors_and_pagination_across_limit() {
    let f = fixture(quick());
    namespace(&f, "a");
    for i in 0..25 {
        let mut p = pod("a", &format!("p{i:02}"), json!({}));
        p["spec"]["nodeName"] = json!(if i % 5 == 0 { "n2" } else { "n1" });
        f.server.create("pods", "a", p).unwrap();
    }
    run(async {
        let pods: Api<Pod> = Api::all(client(&f).await);
        let on_n2 = pods.list(&ListParams::default().fields("spec.nodeName=n2")).await.unwrap();
        assert_eq!(on_n2.items.iter().map(name_of).collect::<Vec<_>>(), ["p00", "p05", "p10", "p15", "p20"]);
        let kube::Error::Api(e) =
            pods.list(&ListParams::default().fields("spec.hostname=x")).await.unwrap_err()
        else {
            panic!("not an API error")
        };
        assert_eq!((e.code, e.message.as_str()), (400, "field label not supported: spec.hostname"));

        let listed_at = f.server.resource_version().to_string();
        let mut names = Vec::new();
        let mut remaining = Vec::new();
        let mut lp = ListParams::default().limit(10);
        let first_rv = loop {
            let page = pods.list(&lp).await.unwrap();
            names.extend(page.items.iter().map(name_of));
            remaining.push(page.metadata.remaining_item_count);
            // A write between pages does not show in later pages.
            f.server.create("pods", "a", pod("a", &format!("zz{}", names.len()), json!({}))).unwrap();
            match page.metadata.continue_ {
                Some(c) if !c.is_empty() => lp = ListParams::default().limit(10).continue_token(&c),
                _ => break page.metadata.resource_version,
            }
        };
        assert_eq!(names.len(), 25);
        assert_eq!(names, (0..25).map(|i| format!("p{i:02}")).collect::<Vec<_>>());
        assert_eq!(remaining, [Some(15), Some(5), None]);
        assert_eq!(first_rv, Some(listed_at), "every page is read at the first page's version");

        // A watcher paging its initial list.
        let before = f.server.counts("pods").lists;
        let (reader, writer) = reflector::store::<Pod>();
        let cfg = watcher::Config::default().page_size(7);
        let stream = reflector(writer, watcher(pods.clone(), cfg)).boxed();
        let driver = tokio::spawn(stream.for_each(|_| async {}));
        reader.wait_until_ready().await.unwrap();
        assert_eq!(reflected_pods(&reader), server_pods(&f));
        assert_eq!(f.server.counts("pods").lists - before, 4, "28 pods in pages of 7");
        driver.abort();
    });
}

/// Drives a reflector and records every watch event after the first list.
struct Reflected {
    reader: reflector::Store<Pod>,
    /// (key, resourceVersion) of every Apply/Delete, in order.
    events: Arc<Mutex<Vec<(String, String)>>>,
    errors: Arc<Mutex<Vec<String>>>,
    driver: tokio::task::JoinHandle<()>,
}

fn reflect(pods: Api<Pod>, cfg: watcher::Config) -> Reflected {
    let (reader, writer) = reflector::store::<Pod>();
    let events = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(Mutex::new(Vec::new()));
    let (ev, er) = (events.clone(), errors.clone());
    let stream = reflector(writer, watcher(pods, cfg)).default_backoff();
    let driver = tokio::spawn(stream.for_each(move |e| {
        match e {
            Ok(Event::Apply(p) | Event::Delete(p)) => {
                let key = format!("{}/{}", p.metadata.namespace.clone().unwrap_or_default(), name_of(&p));
                ev.lock().unwrap().push((key, p.metadata.resource_version.clone().unwrap_or_default()));
            }
            Ok(_) => {}
            Err(e) => er.lock().unwrap().push(e.to_string()),
        }
        async {}
    }));
    Reflected { reader, events, errors, driver }
}

/// Creates, modifies and deletes some pods.
fn churn(f: &Fixture, round: usize) {
    f.server.create("pods", "a", pod("a", &format!("new{round}"), json!({}))).unwrap();
    f.server
        .merge_patch(
            "pods",
            "a",
            &format!("p{round}"),
            json!({ "metadata": { "labels": { "round": round.to_string() } } }),
        )
        .unwrap();
    f.server.delete("pods", "a", &format!("p{}", round + 20)).unwrap();
}

#[test]
fn reflector_resumes_through_cut_streams_and_restarts_and_converges_exactly() {
    let f = fixture(quick());
    namespace(&f, "a");
    for i in 0..40 {
        f.server.create("pods", "a", pod("a", &format!("p{i}"), json!({}))).unwrap();
    }
    run(async {
        let pods: Api<Pod> = Api::all(client(&f).await);
        let r = reflect(pods, watcher::Config::default());
        r.reader.wait_until_ready().await.unwrap();
        assert!(eventually(|| f.server.counts("pods").open_watches == 1).await, "the watch is not open");
        for round in 0..6 {
            churn(&f, round);
            // Proves the watch sees changes before it is cut.
            assert!(
                eventually(|| reflected_pods(&r.reader) == server_pods(&f)).await,
                "round {round}: no convergence"
            );
            if round % 2 == 0 {
                f.server.kill_streams();
            } else {
                f.server.restart().unwrap();
            }
            churn(&f, round + 10);
        }
        assert!(
            eventually(|| reflected_pods(&r.reader) == server_pods(&f)).await,
            "reflector {:?}\nserver {:?}",
            reflected_pods(&r.reader),
            server_pods(&f)
        );
        let counts = f.server.counts("pods");
        assert_eq!(counts.lists, 1, "resumed from its resourceVersion, never relisted: {counts:?}");
        assert!(counts.watches >= 7, "one watch per cut: {counts:?}");
        let events = r.events.lock().unwrap().clone();
        let distinct: HashSet<_> = events.iter().collect();
        assert_eq!(distinct.len(), events.len(), "an event was delivered twice: {events:?}");
        // Every change after the list arrived: 3 per churn, 12 churns.
        assert_eq!(events.len(), 36, "{events:?}");
        r.driver.abort();
    });
}

#[test]
fn compaction_and_a_cut_stream_force_410_then_a_relist_that_converges() {
    let f = fixture(quick());
    namespace(&f, "a");
    for i in 0..30 {
        f.server.create("pods", "a", pod("a", &format!("p{i}"), json!({}))).unwrap();
    }
    run(async {
        let pods: Api<Pod> = Api::all(client(&f).await);
        // Without bookmarks the watcher's resourceVersion stays at its last pod event.
        let r = reflect(pods.clone(), watcher::Config::default().disable_bookmarks());
        r.reader.wait_until_ready().await.unwrap();
        assert!(eventually(|| f.server.counts("pods").open_watches == 1).await, "the watch is not open");
        namespace(&f, "b"); // moves the revision past the pods' last one
        f.server.compact();
        churn(&f, 0);
        assert!(eventually(|| reflected_pods(&r.reader) == server_pods(&f)).await);
        assert_eq!(f.server.counts("pods").lists, 1);
        // The watcher's resourceVersion is its last pod event's; compact past it.
        namespace(&f, "c");
        f.server.compact();
        f.server.kill_streams();
        churn(&f, 1);
        assert!(
            eventually(|| f.server.counts("pods").lists == 2).await,
            "no relist: {:?}",
            f.server.counts("pods")
        );
        assert!(eventually(|| reflected_pods(&r.reader) == server_pods(&f)).await);
        let errors = r.errors.lock().unwrap().clone();
        assert!(errors.iter().any(|e| e.contains("too old resource version")), "no 410 seen: {errors:?}");
        r.driver.abort();
    });
}

#[test]
fn raw_watches_get_bookmarks_streaming_lists_410_events_and_timeouts() {
    let f = fixture(quick());
    namespace(&f, "a");
    f.server.create("pods", "a", pod("a", "p1", json!({}))).unwrap();
    run(async {
        let pods: Api<Pod> = Api::all(client(&f).await);
        let mut s = pods.watch(&WatchParams::default(), "0").await.unwrap().boxed();
        assert!(matches!(next(&mut s).await.unwrap(), WatchEvent::Added(p) if name_of(&p) == "p1"));
        namespace(&f, "b"); // another resource moves the revision
        let rv = f.server.resource_version().to_string();
        loop {
            match next(&mut s).await.unwrap() {
                WatchEvent::Bookmark(b) if b.metadata.resource_version == rv => break,
                WatchEvent::Bookmark(_) => {}
                e => panic!("unexpected {e:?}"),
            }
        }

        let mut s = pods.watch(&WatchParams::default().initial_events(), "").await.unwrap().boxed();
        assert!(matches!(next(&mut s).await.unwrap(), WatchEvent::Added(p) if name_of(&p) == "p1"));
        let WatchEvent::Bookmark(end) = next(&mut s).await.unwrap() else {
            panic!("no end-of-initial-events bookmark")
        };
        assert_eq!(
            end.metadata.annotations.get("k8s.io/initial-events-end").map(String::as_str),
            Some("true")
        );
        assert_eq!(end.metadata.resource_version, rv);

        let streamed = watcher(pods.clone(), watcher::Config::default().streaming_lists());
        let mut streamed = streamed.boxed();
        let mut seen = Vec::new();
        loop {
            match next(&mut streamed).await.unwrap() {
                Event::InitApply(p) => seen.push(name_of(&p)),
                Event::InitDone => break,
                _ => {}
            }
        }
        assert_eq!(seen, ["p1"]);
        assert_eq!(f.server.counts("pods").lists, 0, "a streaming list needs no LIST");

        namespace(&f, "c");
        f.server.compact();
        let mut s = pods.watch(&WatchParams::default(), &rv).await.unwrap().boxed();
        let WatchEvent::Error(gone) = next(&mut s).await.unwrap() else { panic!("no 410 event") };
        assert_eq!((gone.code, gone.reason.as_str()), (410, "Expired"));
        assert!(
            tokio::time::timeout(PATIENCE, s.next()).await.unwrap().is_none(),
            "the stream goes on after 410"
        );

        let started = Instant::now();
        let mut s =
            pods.watch(&WatchParams::default().timeout(1).disable_bookmarks(), "0").await.unwrap().boxed();
        assert!(matches!(next(&mut s).await.unwrap(), WatchEvent::Added(_)));
        assert!(
            tokio::time::timeout(PATIENCE, s.next()).await.unwrap().is_none(),
            "no clean end at the timeout"
        );
        assert!(started.elapsed() >= Duration::from_millis(900));
    });
}

#[test]
fn token_review_answers_for_valid_unknown_expired_and_wrong_audience_tokens() {
    let f = fixture(quick());
    let zt = f.server.create("pods", "kube-system", pod("kube-system", "ztunnel-x1", json!({}))).unwrap();
    let pod_uid = zt["metadata"]["uid"].as_str().unwrap().to_owned();
    let hour = Duration::from_secs(3600);
    let bound = TokenInfo::new("kube-system", "ztunnel", &["ztunnel-ca"], hour)
        .bound_to_pod("ztunnel-x1", &pod_uid)
        .on_node("n1", "node-uid-1");
    f.server.register_token("valid", bound.clone());
    f.server.register_token("expired", TokenInfo { expires_at: SystemTime::now() - hour, ..bound.clone() });
    f.server.register_token("api", TokenInfo::new("kube-system", "ztunnel", &[API_AUDIENCE], hour));
    run(async {
        let reviews: Api<TokenReview> = Api::all(client(&f).await);
        let review = |token: &str, audiences: &[&str]| {
            let tr = TokenReview {
                spec: TokenReviewSpec {
                    token: Some(token.to_owned()),
                    audiences: Some(audiences.iter().map(|a| (*a).to_owned()).collect()),
                },
                ..Default::default()
            };
            let reviews = reviews.clone();
            async move { reviews.create(&PostParams::default(), &tr).await.unwrap().status.unwrap() }
        };
        let ok = review("valid", &["ztunnel-ca"]).await;
        assert_eq!(ok.authenticated, Some(true));
        assert_eq!(ok.audiences, Some(vec!["ztunnel-ca".to_owned()]));
        let user = ok.user.unwrap();
        assert_eq!(user.username.as_deref(), Some("system:serviceaccount:kube-system:ztunnel"));
        assert!(user.groups.unwrap().contains(&"system:serviceaccounts:kube-system".to_owned()));
        let extra = user.extra.unwrap();
        assert_eq!(extra["authentication.kubernetes.io/pod-name"], ["ztunnel-x1"]);
        assert_eq!(extra["authentication.kubernetes.io/pod-uid"], std::slice::from_ref(&pod_uid));
        assert_eq!(extra["authentication.kubernetes.io/node-name"], ["n1"]);
        assert_eq!(extra["authentication.kubernetes.io/node-uid"], ["node-uid-1"]);

        for (token, audiences, error) in [
            ("unknown", &["ztunnel-ca"][..], "invalid bearer token"),
            ("expired", &["ztunnel-ca"], "service account token has expired"),
            (
                "valid",
                &["other"],
                r#"token audiences ["ztunnel-ca"] is invalid for the target audiences ["other"]"#,
            ),
            (
                "valid",
                &[],
                "is invalid for the target audiences [\"https://kubernetes.default.svc.cluster.local\"]",
            ),
        ] {
            let status = review(token, audiences).await;
            assert_ne!(status.authenticated, Some(true), "{token} {audiences:?}");
            let got = status.error.unwrap_or_default();
            assert!(got.contains(error), "{token} {audiences:?}: {got}");
        }
        // A pod-bound token dies with its pod.
        f.server.delete("pods", "kube-system", "ztunnel-x1").unwrap();
        let status = review("valid", &["ztunnel-ca"]).await;
        assert!(status.error.unwrap_or_default().contains("service account token has been invalidated"));
    });
    // Requests need a token the API server accepts.
    let (code, status) = raw(&f, "GET", "/api/v1/namespaces", None, None);
    assert_eq!(
        (code, status["kind"].as_str(), status["reason"].as_str()),
        (401, Some("Status"), Some("Unauthorized"))
    );
    assert_eq!(
        raw(&f, "GET", "/api/v1/namespaces", Some("valid"), None).0,
        401,
        "not for the API's audience"
    );
    assert_eq!(raw(&f, "GET", "/api/v1/namespaces", Some("api"), None).0, 200);
    assert_eq!(raw(&f, "GET", "/healthz", None, None), (200, Value::String("ok".into())));
}

#[test]
fn outage_answers_503_and_watchers_come_back() {
    let f = fixture(quick());
    namespace(&f, "a");
    run(async {
        let pods: Api<Pod> = Api::all(client(&f).await);
        let r = reflect(pods.clone(), watcher::Config::default());
        r.reader.wait_until_ready().await.unwrap();
        f.server.set_unavailable(true);
        // Raw requests: kube's client retries a 503 up to 15 times, for minutes.
        let (code, status) = raw(&f, "GET", "/api/v1/pods", Some(f.server.token()), None);
        assert_eq!((code, status["reason"].as_str()), (503, Some("ServiceUnavailable")));
        assert_eq!(raw(&f, "GET", "/readyz", None, None).0, 503);
        f.server.create("pods", "a", pod("a", "during", json!({}))).unwrap();
        f.server.set_unavailable(false);
        assert!(eventually(|| reflected_pods(&r.reader) == server_pods(&f)).await);
        assert_eq!(reflected_pods(&r.reader).len(), 1);
        assert_eq!(f.server.counts("pods").lists, 1, "resumed without a relist");
        r.driver.abort();
    });
    assert_eq!(raw(&f, "GET", "/readyz", None, None).0, 200);
}

#[test]
fn ten_thousand_pods_load_and_list_through_kube() {
    let f = fixture(Options::default());
    for i in 0..10 {
        namespace(&f, &format!("ns{i}"));
    }
    let started = Instant::now();
    let pods = (0..10_000).map(|i| {
        let mut p =
            pod(&format!("ns{}", i % 10), &format!("pod-{i}"), json!({ "app": format!("app-{}", i % 1000) }));
        p["status"] = json!({ "phase": "Running", "podIP": format!("198.19.{}.{}", i / 250, i % 250 + 2) });
        p
    });
    assert_eq!(f.server.create_many("pods", pods).unwrap(), 10_000);
    let services = (0..1_000).map(|i| {
        json!({ "metadata": { "name": format!("svc-{i}"), "namespace": format!("ns{}", i % 10) },
                "spec": { "selector": { "app": format!("app-{i}") }, "ports": [{ "port": 80 }] } })
    });
    assert_eq!(f.server.create_many("services", services).unwrap(), 1_000);
    println!("create_many: 10,000 pods and 1,000 services in {:?}", started.elapsed());
    run(async {
        let pods: Api<Pod> = Api::all(client(&f).await);
        let started = Instant::now();
        let (mut n, mut lp) = (0, ListParams::default().limit(500));
        loop {
            let page = pods.list(&lp).await.unwrap();
            n += page.items.len();
            match page.metadata.continue_ {
                Some(c) if !c.is_empty() => lp = ListParams::default().limit(500).continue_token(&c),
                _ => break,
            }
        }
        assert_eq!(n, 10_000);
        println!("kube list of 10,000 pods in pages of 500: {:?}", started.elapsed());
        let started = Instant::now();
        let r = reflect(pods, watcher::Config::default());
        r.reader.wait_until_ready().await.unwrap();
        assert_eq!(r.reader.len(), 10_000);
        println!("reflector initial sync of 10,000 pods: {:?}", started.elapsed());
        r.driver.abort();
    });
}

/// Opens a raw WATCH and reads until `want` has arrived; returns the socket
/// and what it read.
fn raw_watch(f: &Fixture, query: &str, want: &str) -> (TcpStream, String) {
    let mut s = TcpStream::connect(f.server.addr()).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    write!(s, "GET /api/v1/pods?watch=true{query} HTTP/1.1\r\nHost: fake\r\nConnection: close\r\nAuthorization: Bearer {}\r\n\r\n", f.server.token())
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains(want) {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed before {want:?}: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    (s, String::from_utf8_lossy(&got).into_owned())
}

/// Reads to the end of the connection: what came, and how long it took.
fn read_rest(mut s: TcpStream) -> (String, Duration) {
    let started = Instant::now();
    let mut rest = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => rest.extend_from_slice(&buf[..n]),
        }
    }
    (String::from_utf8_lossy(&rest).into_owned(), started.elapsed())
}

#[test]
fn kill_streams_cuts_watch_connections_where_a_timeout_ends_them_cleanly() {
    let f = fixture(quick());
    namespace(&f, "a");
    f.server.create("pods", "a", pod("a", "p1", json!({}))).unwrap();
    // A clean end first, to show what the cut must not look like.
    let (s, head) = raw_watch(&f, "&timeoutSeconds=1", "\"ADDED\"");
    assert!(head.starts_with("HTTP/1.1 200") && head.contains("chunked"), "{head}");
    let (rest, _) = read_rest(s);
    assert!(format!("{head}{rest}").ends_with("0\r\n\r\n"), "no final chunk at the timeout: {rest:?}");

    let (s, _) = raw_watch(&f, "", "\"ADDED\"");
    assert!(eventually_sync(|| f.server.counts("pods").open_watches == 1));
    f.server.kill_streams();
    let (rest, took) = read_rest(s);
    assert!(!rest.ends_with("0\r\n\r\n"), "the cut ended the body cleanly: {rest:?}");
    assert!(took < PATIENCE, "the connection stayed open after the cut");
    assert!(eventually_sync(|| f.server.counts("pods").open_watches == 0));
}

fn eventually_sync(mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}
