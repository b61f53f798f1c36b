//! Interim (1xx) responses through the edge. hyper 1.12 cannot send a 1xx from a
//! server (on HTTP/1.1 or h2), so an origin's `103 Early Hints` is not relayed; what
//! holds is that no 1xx is ever stored or replayed, the final response arrives whole,
//! and `100-continue` keeps working for uploads.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{ensure, Result};

use crate::cache_support::cache_stack;

const HINTS_SITE: &str = "hints.example.com";

/// An origin that answers every request with a `103 Early Hints` and then a cacheable
/// `200` (what hyper's own server cannot send), over raw sockets; counts requests.
struct HintingOrigin {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
}

impl HintingOrigin {
    fn start() -> Result<HintingOrigin> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let requests = Arc::new(AtomicUsize::new(0));
        let seen = requests.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let seen = seen.clone();
                std::thread::spawn(move || {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    // One request per connection is enough for the edge's GETs.
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    seen.fetch_add(1, Ordering::Relaxed);
                    let _ = conn.write_all(
                        b"HTTP/1.1 103 Early Hints\r\n\
                          Link: </style.css>; rel=preload; as=style\r\n\r\n\
                          HTTP/1.1 200 OK\r\n\
                          Cache-Control: max-age=60\r\n\
                          Content-Type: text/plain\r\n\
                          Content-Length: 6\r\n\
                          Connection: close\r\n\r\n\
                          hinted",
                    );
                });
            }
        });
        Ok(HintingOrigin { addr, requests })
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }
}

#[test]
fn an_origins_103_is_never_stored_or_replayed_and_the_final_response_arrives() -> Result<()> {
    let origin = HintingOrigin::start()?;
    let s = cache_stack(|c| c.site(&[HINTS_SITE], &format!("http://{}", origin.addr)))?;
    for h2 in [false, true] {
        let path = if h2 { "/h2" } else { "/h1" };
        let get = || {
            let req = s.req(path).host(HINTS_SITE);
            if h2 { req.h2() } else { req }.send()
        };
        let first = get()?;
        first.expect(200, "hinted")?.expect_stored()?;
        let hit = get()?;
        hit.expect(200, "hinted")?.expect_hit()?;
        for r in [&first, &hit] {
            ensure!(
                r.informational.is_empty(),
                "hyper cannot relay a 1xx; none may appear: {:?} {}",
                r.informational,
                r.show()
            );
            ensure!(
                r.header("link").is_none(),
                "the 103's fields leaked into the final response: {}",
                r.show()
            );
        }
    }
    ensure!(
        origin.requests() == 2,
        "the origin saw {} requests",
        origin.requests()
    );
    Ok(())
}

#[test]
fn expect_100_continue_uploads_go_through() -> Result<()> {
    let s = cache_stack(|c| c)?;
    // Larger than curl's 1 KiB threshold, so curl itself waits for the 100.
    let body = "x".repeat(64 * 1024);
    for h2 in [false, true] {
        let req = s
            .req("/upload")
            .method("POST")
            .header("Expect: 100-continue")
            .data(&body);
        let r = if h2 { req.h2() } else { req }.send()?;
        ensure!(r.status == 200, "upload answered {}", r.show());
        ensure!(
            r.text().contains(&body.len().to_string()),
            "the origin did not get the whole body: {}",
            r.show()
        );
        if !h2 {
            ensure!(
                r.informational == [100],
                "expected one 100 Continue before the answer: {:?}",
                r.informational
            );
        }
    }
    Ok(())
}
