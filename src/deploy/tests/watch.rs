//! The watch of the active release over fakes: a slow check under load is no loss, a
//! run of failed checks is, a disconnected release is handled, and what `status` and the
//! metrics say at each step.

use std::sync::Mutex as StdMutex;
use std::time::Instant;

use super::*;
use crate::deploy::watch::Watch;
use crate::docker::NetworkEvent;
use crate::metrics::{Metrics, Scrape};

fn watched(image: &str, extra: &str) -> Manifest {
    let text = format!(
        "name: web\nimage: {image}\nports: [{{host: 8080, container: 80}}]\nkeep: 3\n\
         health: {{type: http, path: /healthz, interval: 10ms, deadline: 200ms}}\ndrain_timeout: 50ms\nwatch: 20ms\n{extra}"
    );
    Manifest::parse(Path::new("web.yaml"), &text).unwrap()
}

/// The world's releaser, recording into metrics the test reads.
fn with_metrics(w: World) -> (World, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let World { engine, firewall, checks, releaser, tx, _dir } = w;
    let releaser = releaser.with_metrics(metrics.clone());
    (World { engine, firewall, checks, releaser, tx, _dir }, metrics)
}

async fn rendered(w: &World, metrics: &Metrics) -> String {
    metrics.render(&Scrape::of_state(&w.releaser.snapshot().await))
}

async fn down(w: &World) -> Option<String> {
    w.releaser.snapshot().await.services["web"].down.clone()
}

fn serving(w: &World) -> Option<String> {
    w.engine.image_at(w.firewall.target(8080)?)
}

#[tokio::test]
async fn slow_checks_under_load_do_nothing_until_failures_in_a_row_then_it_rolls_back() {
    let (w, metrics) = with_metrics(world());
    w.releaser.apply(watched("web:1", "on_failure: rollback\n"), &w.tx).await.unwrap();
    w.releaser.deploy("web", "web:2", &w.tx).await.unwrap();
    let watch = StdMutex::new(Watch::default());
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);

    // One slow answer, then another after a pass: never three in a row.
    w.checks.slow.store(1, Ordering::SeqCst);
    w.releaser.probe_round(&watch, at(0)).await;
    w.releaser.probe_round(&watch, at(1000)).await;
    w.checks.slow.store(2, Ordering::SeqCst);
    w.releaser.probe_round(&watch, at(2000)).await;
    // `interval: 10ms` is watched every second at the most: no check is due yet.
    w.releaser.probe_round(&watch, at(2500)).await;
    assert_eq!(w.checks.slow.load(Ordering::SeqCst), 1, "a check ran before its second was up");
    w.releaser.probe_round(&watch, at(3000)).await;
    w.releaser.probe_round(&watch, at(4000)).await;
    assert_eq!(serving(&w).as_deref(), Some("web:2"));
    assert_eq!(active(&w).await, Some(2));
    assert_eq!(down(&w).await, None);
    assert_eq!(w.releaser.snapshot().await.services["web"].history.len(), 2, "no operation ran");
    assert!(!rendered(&w, &metrics).await.contains("cutover_active_lost_total{"));

    // Three in a row (`health.failures` defaults to 3): rolled back to the kept release.
    w.checks.slow.store(3, Ordering::SeqCst);
    for s in 5..=7 {
        w.releaser.probe_round(&watch, at(s * 1000)).await;
    }
    assert_eq!(serving(&w).as_deref(), Some("web:1"));
    assert_eq!(active(&w).await, Some(1));
    assert_eq!(down(&w).await, None, "served again by release 1");
    let text = rendered(&w, &metrics).await;
    assert!(text.contains("cutover_active_lost_total{service=\"web\",reason=\"unhealthy\"} 1\n"), "{text}");
    assert!(text.contains("cutover_active_down{service=\"web\"} 0\n"), "{text}");
    let last = w.releaser.snapshot().await.services["web"].history.last().cloned().unwrap();
    assert_eq!((last.kind, last.from, last.to, last.outcome.as_str()), (OperationKind::Rollback, Some(2), 1, "switched"));
}

/// `none`, and `restart` (the default) too: `restart` restarts releases that died, never
/// one that runs and fails its checks (an overloaded release would lose the clients it
/// only slows). Both report it as DOWN, touch nothing, and clear DOWN when it passes again.
#[tokio::test]
async fn a_running_release_failing_its_checks_is_shown_down_until_it_passes_again_under_none_and_restart() {
    for policy in ["on_failure: none\n", ""] {
        let (w, metrics) = with_metrics(world());
        let mut m = watched("web:1", policy);
        m.health.failures = 2;
        w.releaser.apply(m, &w.tx).await.unwrap();
        let engine_log = w.engine.log.lock().unwrap().len();
        let watch = StdMutex::new(Watch::default());
        let t0 = Instant::now();
        w.checks.slow.store(4, Ordering::SeqCst);
        w.releaser.probe_round(&watch, t0).await;
        assert_eq!(down(&w).await, None, "{policy}: one failure of two");
        w.releaser.probe_round(&watch, t0 + Duration::from_secs(1)).await;
        let why = down(&w).await.expect("down after two failures in a row");
        assert!(why.contains("release 1 failed 2 health checks in a row") && why.contains("no answer"), "{policy}: {why}");
        let text = rendered(&w, &metrics).await;
        assert!(text.contains("cutover_active_down{service=\"web\"} 1\n"), "{policy}: {text}");
        // Still failing: counted once, nothing touched.
        w.releaser.probe_round(&watch, t0 + Duration::from_secs(2)).await;
        w.releaser.probe_round(&watch, t0 + Duration::from_secs(3)).await;
        let text = rendered(&w, &metrics).await;
        assert!(text.contains("cutover_active_lost_total{service=\"web\",reason=\"unhealthy\"} 1\n"), "{policy}: {text}");
        assert_eq!(w.engine.log.lock().unwrap().len(), engine_log, "{policy}: the container was touched");
        assert_eq!(serving(&w).as_deref(), Some("web:1"));
        // It answers again: DOWN clears.
        w.releaser.probe_round(&watch, t0 + Duration::from_secs(4)).await;
        assert_eq!(down(&w).await, None, "{policy}");
        assert!(rendered(&w, &metrics).await.contains("cutover_active_down{service=\"web\"} 0\n"), "{policy}");
    }
}

#[tokio::test]
async fn a_disconnected_active_release_is_connected_again_and_the_rules_follow_its_address() {
    let (w, metrics) = with_metrics(world());
    w.releaser.apply(watched("web:1", ""), &w.tx).await.unwrap();
    let before = w.firewall.target(8080).unwrap();
    let id = "id-cutover-web-1";
    w.engine.disconnect(id);
    let watch = StdMutex::new(Watch::default());
    let event = NetworkEvent { container: id.into(), network: "bridge".into(), network_id: "f00".into(), connected: false };
    w.releaser.network_event(&event, &watch).await;
    assert!(w.engine.log.lock().unwrap().contains(&format!("connect {id} bridge")));
    let after = w.firewall.target(8080).unwrap();
    assert_ne!(after, before, "the rules still name the address it lost");
    assert_eq!(serving(&w).as_deref(), Some("web:1"));
    assert_eq!(down(&w).await, None);
    let text = rendered(&w, &metrics).await;
    assert!(text.contains("cutover_active_lost_total{service=\"web\",reason=\"disconnected\"} 1\n"), "{text}");
    // A disconnect of another network, or of a release that is not active: nothing.
    let other = NetworkEvent { network: "other".into(), network_id: "b42".into(), ..event.clone() };
    w.engine.disconnect(id);
    w.releaser.network_event(&other, &watch).await;
    assert_eq!(down(&w).await, None);
}

#[tokio::test]
async fn a_disconnected_active_release_is_rolled_back_and_kept_connected() {
    let w = world();
    w.releaser.apply(watched("web:1", "on_failure: rollback\n"), &w.tx).await.unwrap();
    w.releaser.deploy("web", "web:2", &w.tx).await.unwrap();
    let id = "id-cutover-web-2";
    w.engine.disconnect(id);
    let watch = StdMutex::new(Watch::default());
    let event = NetworkEvent { container: id.into(), network: "bridge".into(), network_id: String::new(), connected: false };
    w.releaser.network_event(&event, &watch).await;
    assert_eq!(serving(&w).as_deref(), Some("web:1"));
    assert_eq!(active(&w).await, Some(1));
    assert_eq!(down(&w).await, None);
    // Release 2 is kept, on its network again, for a later rollback.
    assert!(w.engine.log.lock().unwrap().contains(&format!("connect {id} bridge")));
    assert_eq!(w.engine.running(), vec!["cutover-web-1"]);
}

/// A release that stopped with no event to say so (the daemon was not running then) is
/// found by its failed checks, and lost as a dead one, not as an unhealthy one.
#[tokio::test]
async fn failed_checks_of_a_release_the_engine_says_is_not_running_count_it_dead() {
    let w = world();
    w.releaser.apply(watched("web:1", "on_failure: none\n"), &w.tx).await.unwrap();
    w.engine.stop("id-cutover-web-1".into(), Duration::ZERO).await.unwrap();
    let watch = StdMutex::new(Watch::default());
    let t0 = Instant::now();
    for s in 0..2 {
        w.releaser.probe_round(&watch, t0 + Duration::from_secs(s)).await;
    }
    assert_eq!(down(&w).await, None, "two failed checks are not yet a loss");
    w.releaser.probe_round(&watch, t0 + Duration::from_secs(2)).await;
    let d = down(&w).await.unwrap_or_default();
    assert!(d.starts_with("release 1 died"), "{d}");
}

#[tokio::test]
async fn failed_checks_of_a_release_the_engine_moved_update_the_rules_instead() {
    let w = world();
    w.releaser.apply(watched("web:1", "on_failure: none\n"), &w.tx).await.unwrap();
    let before = w.firewall.target(8080).unwrap();
    // The engine restarted it (it came back) with another address, unseen by the events.
    w.engine.start("id-cutover-web-1".into()).await.unwrap();
    let watch = StdMutex::new(Watch::default());
    let t0 = Instant::now();
    for s in 0..3 {
        w.releaser.probe_round(&watch, t0 + Duration::from_secs(s)).await;
    }
    assert_eq!(down(&w).await, None);
    assert_ne!(w.firewall.target(8080), Some(before));
    assert_eq!(serving(&w).as_deref(), Some("web:1"));
}
