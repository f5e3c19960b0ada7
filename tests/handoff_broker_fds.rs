#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Bad peers against the broker: malformed, truncated and oversized frames, a wrong
//! version, more than 253 fds, fds where none belong. Each gets a clear error, the broker
//! keeps serving others (also while one peer holds a connection open and says nothing),
//! and the serving process leaks no fd.
//!
//! Alone in its own test binary: it counts the fds of this process, which other tests
//! running in parallel threads would disturb.

use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use cutover::handoff::broker::{fetch_listeners, Broker, Namespace, Policy};
use cutover::handoff::fds::{self, SocketName};
use cutover::handoff::listeners::ListenSpec;
use cutover::handoff::protocol::{self, ErrorCode, Message};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn header(version: u16, kind: u16, body_len: u32, fd_count: u32) -> Vec<u8> {
    let mut f = b"CUTO".to_vec();
    f.extend_from_slice(&version.to_le_bytes());
    f.extend_from_slice(&kind.to_le_bytes());
    f.extend_from_slice(&body_len.to_le_bytes());
    f.extend_from_slice(&fd_count.to_le_bytes());
    f
}

/// (what, record, fds attached, expected code, text the message must contain)
type Case<'a> = (&'static str, Vec<u8>, Vec<&'a OwnedFd>, ErrorCode, &'static str);

/// Sends one raw record (with `fds` attached) and returns the broker's error code.
fn error_for(socket: &SocketName, record: &[u8], fds_to_send: &[&OwnedFd]) -> (ErrorCode, String) {
    let conn = fds::connect(socket).unwrap();
    fds::set_timeouts(conn.as_fd(), Duration::from_secs(5)).unwrap();
    let borrowed: Vec<_> = fds_to_send.iter().map(|f| f.as_fd()).collect();
    fds::send_raw(conn.as_fd(), record, &borrowed).unwrap();
    match fds::recv_message(conn.as_fd()).unwrap() {
        (Message::Error { code, message }, _) => (code, message),
        (other, _) => panic!("expected an Error frame, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_peers_get_clear_errors_the_broker_keeps_serving_and_leaks_no_fd() {
    let svc = format!("t{}-fds", std::process::id());
    let spec = ListenSpec::parse("http=tcp://127.0.0.1:0", "http").unwrap();
    let broker = Broker::bind_in_namespace(&Namespace::Current, &svc, &[spec], Policy::new()).unwrap();
    broker.allow_pid(std::process::id() as i32).unwrap();
    let socket = broker.socket().clone();

    // A peer that connects and never speaks, for the whole test.
    let idle = fds::connect(&socket).unwrap();

    let rounds = 20;
    let s = socket.clone();
    let (before, connections) = tokio::task::spawn_blocking(move || {
        let socket = s;
        // Warm up every code path once before counting.
        drop(fetch_listeners(&socket, &[]).unwrap());
        let _ = error_for(&socket, b"warm", &[]);
        std::thread::sleep(Duration::from_millis(200));
        let before = open_fds();
        let (spare_a, spare_b): (OwnedFd, OwnedFd) = fds::pair().unwrap();
        let mut connections = 2u64;
        for _ in 0..rounds {
            let cases: Vec<Case> = vec![
                ("garbage", b"GET / HTTP/1.1\r\n\r\n".to_vec(), vec![], ErrorCode::Malformed, "magic"),
                ("truncated header", b"CUTO\x01\x00".to_vec(), vec![], ErrorCode::Malformed, "truncated"),
                ("truncated body", [header(1, 1, 100, 0), vec![0; 10]].concat(), vec![], ErrorCode::Malformed, "announces 100"),
                ("body ends inside a field", [header(1, 1, 4, 0), vec![1, 0, 9, 0]].concat(), vec![], ErrorCode::Malformed, "truncated"),
                ("wrong version", [header(2, 1, 2, 0), vec![0, 0]].concat(), vec![], ErrorCode::UnsupportedVersion, "version 2"),
                ("oversized", vec![0u8; protocol::MAX_FRAME + 4000], vec![], ErrorCode::TooLarge, "larger than"),
                ("more than 253 fds announced", [header(1, 1, 2, 254), vec![0, 0]].concat(), vec![], ErrorCode::TooManyFds, "253"),
                ("fds where none belong", protocol::encode(&Message::RequestListeners { names: vec![] }).unwrap(), vec![&spare_a, &spare_b, &spare_a], ErrorCode::Malformed, "3 arrived"),
                ("fds announced, none sent", [header(1, 2, 5, 1), vec![1, 0, 1, 0, b'a']].concat(), vec![], ErrorCode::Malformed, "0 arrived"),
                ("unexpected kind", protocol::encode(&Message::Takeover).unwrap(), vec![], ErrorCode::Unexpected, "RequestListeners only"),
                ("unknown listener", protocol::encode(&Message::RequestListeners { names: vec!["nope".into()] }).unwrap(), vec![], ErrorCode::UnknownListener, "no listener `nope`"),
            ];
            for (what, record, attach, code, text) in cases {
                let (got, message) = error_for(&socket, &record, &attach);
                assert_eq!(got, code, "{what}: {message}");
                assert!(message.contains(text), "{what}: `{message}` does not say `{text}`");
                connections += 1;
                // Others are still served, with a working listener.
                let l = fetch_listeners(&socket, &["http"]).unwrap();
                assert_eq!(l.len(), 1);
                connections += 1;
            }
            // A peer that connects and hangs up at once.
            drop(fds::connect(&socket).unwrap());
            connections += 1;
        }
        // The kernel refuses more than 253 fds per message; the transport says so first.
        let conn = fds::connect(&socket).unwrap();
        let many: Vec<_> = (0..254).map(|_| spare_a.as_fd()).collect();
        let err = fds::send_raw(conn.as_fd(), b"x", &many).unwrap_err();
        assert!(err.to_string().contains("at most 253"), "{err}");
        drop(conn);
        connections += 1;
        drop((spare_a, spare_b));
        (before, connections)
    })
    .await
    .unwrap();

    // Wait until the broker has finished with every connection (not the idle one).
    let deadline = Instant::now() + Duration::from_secs(10);
    while broker.stats().snapshot().3 < connections && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (served, refused, bad, done) = broker.stats().snapshot();
    println!("broker: {served} served, {refused} refused, {bad} bad requests, {done} connections closed");
    assert_eq!(done, connections, "the broker did not finish every connection");
    assert_eq!(bad, 1 + 10 * rounds as u64, "every bad frame counted (warm-up included)");
    let now = open_fds();
    assert_eq!(now, before, "fd count changed: {before} before, {now} after {connections} connections");
    drop(idle);
}
