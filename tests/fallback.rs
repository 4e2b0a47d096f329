//! Fallback chains and nesting over real loopback mock servers.

mod common;

use std::time::Duration;

use common::{FullBody, chat, group_target, refusing};
use http_body_util::BodyExt;
use tokio::time::Instant;
use tower::ServiceExt;
use tower_llm_lb::balance::Balance;
use tower_llm_lb::error::Exhausted;
use tower_llm_lb::fallback::{BoxTarget, Fallback, Overrides, ServedPath};
use tower_llm_lb::retry::{Attempts, RetryAfter429Layer};
use tower_llm_lb::{Backend, Outcome};
use tower_llm_lb_mock::{Fault, MockServer};

fn azure(name: &str, m: &MockServer, deployment: &str) -> Backend {
    Backend::azure(name, m.url(), deployment, "2024-10-21")
        .build()
        .unwrap()
}

fn openai(name: &str, m: &MockServer) -> Backend {
    Backend::openai(name, format!("{}/v1", m.url()))
        .build()
        .unwrap()
}

fn target(backends: &[Backend]) -> BoxTarget<FullBody> {
    group_target(backends, RetryAfter429Layer::default())
}

#[tokio::test(start_paused = true)]
async fn a_throttled_8k_deployment_falls_back_to_the_32k_one_with_model_overridden() {
    let small = MockServer::builder().name("8k").start().await.unwrap();
    small.set_fault(Some(Fault::Status(429)));
    let big = MockServer::builder().name("32k").start().await.unwrap();
    let chain = Fallback::builder("gpt-4")
        .target(
            "gpt-4-8k",
            target(&[azure("eastus-8k", &small, "gpt-4-8k")]),
        )
        .target_with(
            "gpt-4-32k",
            target(&[azure("eastus-32k", &big, "gpt-4-32k")]),
            Overrides::default()
                .set("model", "gpt-4-32k")
                .set("max_tokens", 4096),
        )
        .settings(tower_llm_lb::fallback::Settings {
            attribution_headers: true,
            ..Default::default()
        })
        .build()
        .unwrap();
    let mut req = chat(r#"{"model":"gpt-4","messages":[{"role":"user","content":"long doc"}]}"#);
    req.headers_mut()
        .insert("x-request-id", "req-42".parse().unwrap());
    let start = Instant::now();
    let res = chain.oneshot(req).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        Instant::now(),
        start,
        "falling back did not wait out a Retry-After"
    );
    let seen = &big.requests()[0];
    let body: serde_json::Value = serde_json::from_slice(&seen.body).unwrap();
    assert_eq!(body["model"], "gpt-4-32k");
    assert_eq!(body["max_tokens"], 4096);
    assert_eq!(body["messages"][0]["content"], "long doc");
    assert_eq!(seen.headers["x-request-id"], "req-42");
    // The first target got the caller's body untouched.
    let first: serde_json::Value = serde_json::from_slice(&small.requests()[0].body).unwrap();
    assert_eq!(first["model"], "gpt-4");
    assert_eq!(
        res.extensions().get::<ServedPath>().unwrap().to_string(),
        "gpt-4[1:gpt-4-32k] -> eastus-32k"
    );
    assert_eq!(res.headers()["x-llm-lb-backend"], "eastus-32k");
    assert_eq!(
        res.headers()["x-llm-lb-attempts"],
        "eastus-8k=throttled, eastus-32k=success"
    );
    assert_eq!(res.headers()["x-llm-lb-attempt-count"], "2");
}

#[tokio::test(start_paused = true)]
async fn a_per_target_deployment_override_changes_the_path_not_the_backend() {
    let resource = MockServer::builder().start().await.unwrap();
    let eastus = azure("eastus", &resource, "gpt-4o");
    let chain = Fallback::builder("models")
        .target("gpt-4o", target(std::slice::from_ref(&eastus)))
        .target("gpt-4o-mini", target(std::slice::from_ref(&eastus)))
        .deployment("gpt-4o-mini")
        .build()
        .unwrap();
    resource.set_fault(Some(Fault::Status(500)));
    let err = chain.clone().oneshot(chat("{}")).await.unwrap_err();
    let paths: Vec<_> = resource
        .requests()
        .into_iter()
        .map(|r| r.path_and_query)
        .collect();
    // The first target moves on at once; the last one, with nowhere else to go, retries its
    // backend after a backoff: always under its own deployment.
    assert_eq!(
        paths[0],
        "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
    );
    // One attempt on the first target, then the last target's four (the default attempts).
    assert_eq!(paths.len(), 5, "{paths:?}");
    assert!(
        paths[1..].iter().all(
            |p| p == "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"
        ),
        "{paths:?}"
    );
    assert!(err.is::<Exhausted>(), "{err}");
    assert!(
        Fallback::<FullBody>::builder("x")
            .deployment("bad/name")
            .build()
            .is_err()
    );
}

#[tokio::test(start_paused = true)]
async fn openai_down_falls_back_to_azure() {
    let azure_mock = MockServer::builder().name("azure").start().await.unwrap();
    let chain = Fallback::builder("providers")
        .target("openai", target(&[refusing("openai")]))
        .target("azure", target(&[azure("eastus", &azure_mock, "gpt-4o")]))
        .build()
        .unwrap();
    let res = chain.oneshot(chat(r#"{"model":"gpt-4o"}"#)).await.unwrap();
    assert_eq!(res.status(), 200);
    let attempts = &res.extensions().get::<Attempts>().unwrap().0;
    assert_eq!(attempts[0].outcome, Outcome::ConnectError);
    assert_eq!(&*attempts.last().unwrap().backend, "eastus");
}

#[tokio::test(start_paused = true)]
async fn a_400_from_the_first_target_is_returned_without_trying_the_second() {
    let a = MockServer::builder().start().await.unwrap();
    let b = MockServer::builder().start().await.unwrap();
    let chain = Fallback::builder("c")
        .target("a", target(&[openai("a", &a)]))
        .target("b", target(&[openai("b", &b)]))
        .build()
        .unwrap();
    let res = chain.oneshot(chat("not json")).await.unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(b.counters().requests, 0);
}

#[tokio::test(start_paused = true)]
async fn an_answer_that_says_x_should_retry_false_is_returned_without_trying_the_next_target() {
    let a = MockServer::builder().start().await.unwrap();
    let b = MockServer::builder().start().await.unwrap();
    a.set_fault(Some(Fault::StatusWith(
        500,
        vec![("x-should-retry".into(), "false".into())],
    )));
    let chain = Fallback::builder("c")
        .target("a", target(&[openai("a", &a)]))
        .target("b", target(&[openai("b", &b)]))
        .build()
        .unwrap();
    let res = chain.clone().oneshot(chat("{}")).await.unwrap();
    assert_eq!(res.status(), 500);
    assert_eq!(a.counters().requests, 1);
    assert_eq!(b.counters().requests, 0);
    // Without the header, the 500 moves on to the next target.
    a.set_fault(Some(Fault::Status(500)));
    let res = chain.oneshot(chat("{}")).await.unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test(start_paused = true)]
async fn when_every_target_fails_one_error_explains_each_failure() {
    let five = MockServer::builder().start().await.unwrap();
    five.set_fault(Some(Fault::Status(502)));
    let chain = Fallback::builder("all-down")
        .target("openai", target(&[refusing("openai")]))
        .target("azure", target(&[azure("westus", &five, "gpt-4o")]))
        .build()
        .unwrap();
    let err = chain.oneshot(chat("{}")).await.unwrap_err();
    let ex = err.downcast_ref::<Exhausted>().expect("Exhausted");
    let text = err.to_string();
    assert!(text.contains("openai: connect error"), "{text}");
    assert!(text.contains("westus: server error 502"), "{text}");
    // The first target moved on after its connect error; the last one, with nowhere else to
    // go, used its four attempts. Every attempt is listed.
    let names: Vec<&str> = ex.attempts.iter().map(|a| &*a.backend).collect();
    assert_eq!(names, ["openai", "westus", "westus", "westus", "westus"]);
    assert_eq!(ex.attempts.last().unwrap().outcome.name(), "server_error");
}

#[tokio::test(start_paused = true)]
async fn when_every_target_is_throttled_the_caller_gets_a_429_with_the_earliest_retry_after() {
    let a = MockServer::builder()
        .rps(1.0)
        .quota_headers(false)
        .start()
        .await
        .unwrap();
    let b = MockServer::builder()
        .rps(1.0)
        .quota_headers(false)
        .start()
        .await
        .unwrap();
    let (ba, bb) = (openai("a", &a), openai("b", &b));
    let chain = Fallback::builder("c")
        .target(
            "a",
            group_target(
                std::slice::from_ref(&ba),
                RetryAfter429Layer {
                    max_wait: Duration::ZERO,
                    ..Default::default()
                },
            ),
        )
        .target(
            "b",
            group_target(
                std::slice::from_ref(&bb),
                RetryAfter429Layer {
                    max_wait: Duration::ZERO,
                    ..Default::default()
                },
            ),
        )
        .build()
        .unwrap();
    // Spend a's quota first, half a second before b's.
    assert_eq!(
        chain.clone().oneshot(chat("{}")).await.unwrap().status(),
        200
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.set_fault(Some(Fault::Status(503)));
    assert_eq!(
        chain.clone().oneshot(chat("{}")).await.unwrap().status(),
        200
    );
    a.set_fault(None);
    let res = chain.oneshot(chat("{}")).await.unwrap();
    assert_eq!(res.status(), 429);
    let ms: u64 = res.headers()["retry-after-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(ms <= 500, "a is free again first, in {ms} ms");
    assert_eq!(res.headers()["retry-after"], "1");
}

#[tokio::test(start_paused = true)]
async fn portkeys_nested_example_a_50_50_balance_whose_second_arm_falls_back() {
    // loadbalance 50/50: [azure-a, fallback(openai -> azure-b)], openai down.
    let azure_a = MockServer::builder().name("a").start().await.unwrap();
    let azure_b = MockServer::builder().name("b").start().await.unwrap();
    let fallback_arm = Fallback::builder("openai-then-azure")
        .target("openai", target(&[refusing("openai")]))
        .target("azure-b", target(&[azure("azure-b", &azure_b, "gpt-4o")]))
        .build()
        .unwrap();
    let fallback_arm = BoxTarget::new(fallback_arm);
    let balance = Balance::builder()
        .member(
            "azure-a",
            0.5,
            0,
            target(&[azure("azure-a", &azure_a, "gpt-4o")]),
            &[],
        )
        .member("fallback", 0.5, 0, fallback_arm, &[])
        .rng(tower_llm_lb::Rng::seeded(3))
        .build()
        .unwrap();
    let n = 2000;
    for _ in 0..n {
        let res = balance.clone().oneshot(chat("{}")).await.unwrap();
        assert_eq!(res.status(), 200);
    }
    let share_a = azure_a.counters().ok as f64 / n as f64;
    let share_b = azure_b.counters().ok as f64 / n as f64;
    assert!((share_a - 0.5).abs() < 0.03, "a served {share_a}");
    assert!((share_b - 0.5).abs() < 0.03, "b served {share_b}");
}

#[tokio::test(start_paused = true)]
async fn an_sse_stream_cut_mid_way_ends_in_an_error_for_the_caller() {
    let mock = MockServer::builder()
        .stream_chunks(6)
        .start()
        .await
        .unwrap();
    mock.set_fault(Some(Fault::TruncateStream(3)));
    let backup = MockServer::builder().start().await.unwrap();
    let chain = Fallback::builder("c")
        .target("first", target(&[openai("first", &mock)]))
        .target("second", target(&[openai("second", &backup)]))
        .build()
        .unwrap();
    let res = chain.oneshot(chat(r#"{"stream":true}"#)).await.unwrap();
    assert_eq!(
        res.status(),
        200,
        "the head arrived: committed to the first target"
    );
    let err = res.into_body().collect().await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("answer interrupted"), "{text}");
    assert_eq!(
        backup.counters().requests,
        0,
        "no failover after bytes reached the caller"
    );
}

#[tokio::test(start_paused = true)]
async fn a_target_with_nothing_free_is_skipped_without_waiting() {
    let busy = MockServer::builder().start().await.unwrap();
    let spare = MockServer::builder().start().await.unwrap();
    let b = openai("busy", &busy);
    // Cooling down for 30 s, as its own 429 asked.
    busy.set_fault(Some(Fault::Throttle(vec![(
        "retry-after".into(),
        "30".into(),
    )])));
    let _ = common::stack(&b).oneshot(chat("{}")).await.unwrap();
    busy.set_fault(None);
    let asked = busy.counters().requests;
    let chain = Fallback::builder("c")
        .target(
            "busy",
            group_target(
                &[b],
                RetryAfter429Layer {
                    max_wait: Duration::from_secs(60),
                    ..Default::default()
                },
            ),
        )
        .target("spare", target(&[openai("spare", &spare)]))
        .build()
        .unwrap();
    let start = Instant::now();
    let res = chain.oneshot(chat("{}")).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(Instant::now(), start, "no wait for the busy target");
    assert_eq!(
        busy.counters().requests,
        asked,
        "nothing more sent to the busy target"
    );
}

#[tokio::test(start_paused = true)]
async fn the_overall_deadline_spans_all_targets() {
    let slow = MockServer::builder().start().await.unwrap();
    slow.set_fault(Some(Fault::Hang));
    let spare = MockServer::builder().start().await.unwrap();
    let chain = Fallback::builder("c")
        .target(
            "slow",
            group_target(&[openai("slow", &slow)], RetryAfter429Layer::default()),
        )
        .target("spare", target(&[openai("spare", &spare)]))
        .settings(tower_llm_lb::fallback::Settings {
            deadline: Some(Duration::from_secs(5)),
            ..Default::default()
        })
        .build()
        .unwrap();
    let start = Instant::now();
    let err = chain.oneshot(chat("{}")).await.unwrap_err();
    assert_eq!(
        Instant::now() - start,
        Duration::from_secs(5),
        "ended at the deadline"
    );
    let ex = err.downcast_ref::<Exhausted>().expect("Exhausted");
    assert_eq!(ex.attempts.len(), 1);
    assert_eq!(&*ex.attempts[0].backend, "slow");
    assert_eq!(ex.attempts[0].outcome, Outcome::Timeout);
    assert_eq!(
        spare.counters().requests,
        0,
        "no target is started past the deadline"
    );
}

#[tokio::test]
async fn invalid_chains_are_errors() {
    assert!(Fallback::<FullBody>::builder("empty").build().is_err());
    let t = target(&[Backend::openai("x", "http://127.0.0.1:9/v1")
        .build()
        .unwrap()]);
    let dup = Fallback::builder("dup")
        .target("a", t.clone())
        .target("a", t)
        .build();
    assert!(dup.unwrap_err().to_string().contains("used twice"));
}

#[tokio::test(start_paused = true)]
async fn a_ready_made_group_splits_a_canary_by_weight() {
    use tower_llm_lb::stack::{self, Settings};
    let stable = MockServer::builder().name("stable").start().await.unwrap();
    let candidate = MockServer::builder()
        .name("candidate")
        .start()
        .await
        .unwrap();
    // Seeded: the pick is weighted random, and 0.02 is three standard deviations of a 0.1
    // share over 2000 draws, which an entropy-seeded run misses about once in 400.
    let settings = Settings {
        rng: Some(tower_llm_lb::Rng::seeded(7)),
        ..Settings::default()
    };
    let svc = stack::group(
        "canary",
        [
            azure("stable", &stable, "gpt-4o").with_weight(0.9).unwrap(),
            azure("candidate", &candidate, "gpt-4o-new")
                .with_weight(0.1)
                .unwrap(),
        ],
        tower_llm_lb::client::http_client(),
        &settings,
    )
    .unwrap();
    let n = 2000;
    for _ in 0..n {
        assert_eq!(svc.clone().oneshot(chat("{}")).await.unwrap().status(), 200);
    }
    let share = candidate.counters().ok as f64 / n as f64;
    assert!((share - 0.1).abs() < 0.02, "canary got {share}");
    assert_eq!(stable.counters().ok + candidate.counters().ok, n as u64);
}

#[tokio::test(start_paused = true)]
async fn an_error_inside_a_200_stream_fails_over_when_the_stream_start_is_held() {
    use tower_llm_lb::endpoint::EndpointLayer;
    let first = MockServer::builder().name("first").start().await.unwrap();
    first.set_fault(Some(Fault::StreamError));
    let second = MockServer::builder().name("second").start().await.unwrap();
    let (a, b) = (openai("first", &first), openai("second", &second));
    let held = |backend: &Backend| {
        common::stack_with(
            EndpointLayer::new(backend.clone()).settings(tower_llm_lb::endpoint::Settings {
                hold_stream_start: Some(4096),
                ..Default::default()
            }),
            backend,
        )
    };
    let chain = Fallback::builder("c")
        .target("first", held(&a))
        .target("second", held(&b))
        .build()
        .unwrap();
    let res = chain.oneshot(chat(r#"{"stream":true}"#)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.extensions().get::<ServedPath>().unwrap().to_string(),
        "c[1:second] -> second"
    );
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(body.ends_with(b"data: [DONE]\n\n"));
    // Without holding, the in-band error is the caller's, inside a 200. (Fresh backends: the
    // first run cooled `first` down for the overload's wait, so it would not be sent to now.)
    let (a, b) = (openai("first", &first), openai("second", &second));
    let plain = Fallback::builder("c")
        .target("first", common::stack(&a))
        .target("second", common::stack(&b))
        .build()
        .unwrap();
    let res = plain.oneshot(chat(r#"{"stream":true}"#)).await.unwrap();
    let err = res.into_body().collect().await.unwrap_err();
    assert!(
        err.to_string().contains("ended without its end marker"),
        "{err}"
    );
}
