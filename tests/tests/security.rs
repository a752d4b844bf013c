//! TLS on every hop, mutual TLS toward the model services, and API keys at
//! the gateway — each accepted when right and refused when not.

#![allow(clippy::unwrap_used)]
// One scenario against one running stack, read top to bottom; the
// 100-line limit is for non-test code.
#![allow(clippy::too_many_lines)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::procs::{Cluster, ClusterOptions};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use sd_proto::v1::denoiser_client::DenoiserClient;
use sd_proto::v1::generation_client::GenerationClient;
use sd_proto::v1::{DenoiserInfoRequest, GenerateRequest};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

struct Pki {
    ca: String,
    server: (String, String),
    client: (String, String),
    rogue_ca: String,
}

fn ca() -> (CertificateParams, KeyPair, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let pem = params.self_signed(&key).unwrap().pem();
    (params, key, pem)
}

fn pki() -> Pki {
    let (ca_params, ca_key, ca_pem) = ca();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    Pki {
        ca: ca_pem,
        server: leaf(vec!["localhost".into(), "127.0.0.1".into()]),
        client: leaf(vec!["sd-gateway".into()]),
        rogue_ca: ca().2,
    }
}

fn write(dir: &Path, name: &str, pem: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, pem).unwrap();
    p.to_string_lossy().into_owned()
}

async fn tls_channel(
    addr: &str,
    ca: &str,
    identity: Option<&(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some((c, k)) = identity {
        tls = tls.identity(Identity::from_pem(c, k));
    }
    Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect()
        .await
}

fn with_key<T>(msg: T, key: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(k) = key {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {k}").parse().unwrap());
    }
    r
}

fn small() -> GenerateRequest {
    GenerateRequest {
        prompt: "secure".into(),
        steps: 2,
        seed: Some(4),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_mtls_and_api_keys_accept_and_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let p = pki();
    let ca = write(dir.path(), "ca.pem", &p.ca);
    let cert = write(dir.path(), "server.pem", &p.server.0);
    let key = write(dir.path(), "server.key", &p.server.1);
    let ccert = write(dir.path(), "client.pem", &p.client.0);
    let ckey = write(dir.path(), "client.key", &p.client.1);
    // API keys from a file (argv would show them in `ps`; it is refused).
    let keys = write(
        dir.path(),
        "api-keys",
        "# the gateway's keys\nk-one\nk-two\n",
    );
    let service_args = [
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-client-ca",
        &ca,
    ];
    let gateway_args = [
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--backend-tls-ca",
        &ca,
        "--backend-tls-cert",
        &ccert,
        "--backend-tls-key",
        &ckey,
        "--backend-tls-domain",
        "localhost",
        "--api-keys-file",
        &keys,
    ];
    let cluster = Cluster::start(
        &common::model("sd1-tiny"),
        ClusterOptions {
            service_args: &service_args,
            gateway_args: &gateway_args,
            ..Default::default()
        },
    )
    .await;

    // Health over TLS needs no key; wait for SERVING (the gateway reached
    // every model service over mutual TLS).
    let ch = tls_channel(&cluster.gateway.addr, &p.ca, None)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let h = HealthClient::new(ch.clone())
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await;
        if matches!(h, Ok(ref r) if r.get_ref().status == 1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "gateway not SERVING over TLS: {h:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // API keys: the right one works end to end, others are UNAUTHENTICATED.
    let mut g = GenerationClient::new(ch.clone());
    let ok = g
        .generate(with_key(small(), Some("k-two")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.images.len(), 1);
    for key in [None, Some("k-three"), Some("")] {
        let e = g.generate(with_key(small(), key)).await.unwrap_err();
        assert_eq!(
            e.code(),
            tonic::Code::Unauthenticated,
            "{key:?}: {}",
            e.message()
        );
    }

    // Plain text, or a server not signed by the CA we trust: refused.
    let plain = Endpoint::from_shared(format!("http://{}", cluster.gateway.addr))
        .unwrap()
        .connect()
        .await;
    if let Ok(plain) = plain {
        assert!(GenerationClient::new(plain)
            .generate(with_key(small(), Some("k-one")))
            .await
            .is_err());
    }
    let rogue = tls_channel(&cluster.gateway.addr, &p.rogue_ca, None).await;
    if let Ok(rogue) = rogue {
        assert!(GenerationClient::new(rogue)
            .generate(with_key(small(), Some("k-one")))
            .await
            .is_err());
    }

    // The model services require a client certificate (mutual TLS).
    let denoiser = &cluster.denoisers[0].addr;
    let anonymous = tls_channel(denoiser, &p.ca, None).await;
    if let Ok(anonymous) = anonymous {
        assert!(DenoiserClient::new(anonymous)
            .info(DenoiserInfoRequest {})
            .await
            .is_err());
    }
    let with_cert = tls_channel(denoiser, &p.ca, Some(&p.client)).await.unwrap();
    let info = DenoiserClient::new(with_cert)
        .info(DenoiserInfoRequest {})
        .await
        .unwrap();
    assert_eq!(info.into_inner().latent_channels, 4);
}
