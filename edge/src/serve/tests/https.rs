//! An https origin (certificates made by the `openssl` tool): TLS verification against
//! `origin_ca`, ALPN h2 upstream with `:authority` kept, and streaming over it.

use super::*;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A CA and a `localhost` / `127.0.0.1` server certificate made by the `openssl` tool
/// in a fresh directory; `None` where the tool is missing.
fn make_origin_pki() -> Option<std::path::PathBuf> {
    use std::process::Command;
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "keyless-proxy-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("leaf.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    let steps = [
        "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key \
         -out ca.pem -days 2 -subj /CN=test-origin-CA",
        "req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout leaf.key \
         -out leaf.csr -subj /CN=localhost",
        "x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
         -out leaf.pem -extfile leaf.ext",
    ];
    for args in steps {
        let ok = Command::new("openssl")
            .args(args.split_whitespace())
            .current_dir(&dir)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !ok {
            eprintln!("openssl unavailable or failed; skipping the https origin test");
            return None;
        }
    }
    Some(dir)
}

/// An https origin offering ALPN h2 and http/1.1.
async fn start_tls_origin(pki: &Path) -> SocketAddr {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(pki.join("leaf.pem"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(pki.join("leaf.key")).unwrap();
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(stream).await else {
                    return;
                };
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service_fn(origin_handler))
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn https_origins_use_h2_and_are_verified() {
    let Some(pki) = make_origin_pki() else { return };
    let origin = start_tls_origin(&pki).await;
    let url = format!("https://localhost:{}", origin.port());
    let edge = start_edge(
        &url,
        EdgeOpts {
            origin_ca: Some(pki.join("ca.pem")),
            ..EdgeOpts::default()
        },
    )
    .await;
    for _ in 0..2 {
        let answer = get(edge.addr, "www.example.com", "/tls?a=b").await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        let seen = answer.text();
        assert!(
            seen.starts_with("GET /tls?a=b\nversion: HTTP/2.0\n"),
            "{seen}"
        );
        assert!(seen.contains("authority: www.example.com\n"), "{seen}");
        assert!(seen.contains("via: 1.1 keyless\n"), "{seen}");
        assert_eq!(answer.headers["via"], "2 keyless");
    }
    let (mut sender, _task) = connect(edge.addr).await;
    let chunks = (0..16).map(|c| {
        let chunk: Vec<u8> = (c * 65536..(c + 1) * 65536).map(pattern).collect();
        Ok::<_, Infallible>(Frame::data(Bytes::from(chunk)))
    });
    let req = Request::post("/upload")
        .header("host", "example.com")
        .body(StreamBody::new(futures_util::stream::iter(chunks)))
        .unwrap();
    let all: Vec<u8> = (0..MIB).map(pattern).collect();
    assert_eq!(
        send(&mut sender, req).await.text(),
        format!("len={MIB} hash={:x}", fnv1a(FNV_START, &all))
    );

    // Without the origin's CA the certificate is not trusted.
    let untrusted = start_edge(&url, EdgeOpts::default()).await;
    let answer = get(untrusted.addr, "example.com", "/").await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert_eq!(answer.text(), "origin TLS handshake failed\n");
    let _ = std::fs::remove_dir_all(&pki);
}
