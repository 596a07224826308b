//! The trust bundle, published where node tunnels mount it: the ConfigMap
//! `ztunnel-trust-bundle` (key `trust-bundle.pem`) in the CA's namespace.
//! The CA's Role allows `create` on ConfigMaps and `get`/`update` on this
//! one only (deploy/kubernetes/base/ca-rbac.yaml), so it never patches or
//! lists.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};

pub const CONFIG_MAP: &str = "ztunnel-trust-bundle";
pub const KEY: &str = "trust-bundle.pem";

/// What publishing did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    Created,
    Updated,
    Unchanged,
}

/// Makes the ConfigMap hold `bundle_pem`.
pub async fn publish(client: &Client, namespace: &str, bundle_pem: &str) -> Result<Published, kube::Error> {
    let api = Api::<ConfigMap>::namespaced(client.clone(), namespace);
    let data = BTreeMap::from([(KEY.to_owned(), bundle_pem.to_owned())]);
    match api.get_opt(CONFIG_MAP).await? {
        Some(current) if current.data.as_ref() == Some(&data) => Ok(Published::Unchanged),
        Some(mut current) => {
            // The resourceVersion read above makes this a compare-and-swap:
            // two CA replicas cannot interleave.
            current.data = Some(data);
            api.replace(CONFIG_MAP, &PostParams::default(), &current).await?;
            Ok(Published::Updated)
        }
        None => {
            let cm = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(CONFIG_MAP.to_owned()),
                    namespace: Some(namespace.to_owned()),
                    labels: Some(BTreeMap::from([
                        ("app.kubernetes.io/part-of".to_owned(), "ztunnel".to_owned()),
                        ("app.kubernetes.io/component".to_owned(), "ca".to_owned()),
                    ])),
                    ..Default::default()
                },
                data: Some(data),
                ..Default::default()
            };
            api.create(&PostParams::default(), &cm).await?;
            Ok(Published::Created)
        }
    }
}
