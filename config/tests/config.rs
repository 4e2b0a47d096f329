//! The config: every error names its field, JSON and TOML share one schema, secrets never come
//! back out, and Portkey's nested example behaves as written against loopback mocks.

#[path = "../../tests/common/mod.rs"]
mod common;

use common::chat;
use tower::ServiceExt;
use tower_llm_lb::client::http_client;
use tower_llm_lb::fallback::ServedPath;
use tower_llm_lb_config::Config;
use tower_llm_lb_mock::MockServer;

fn build_err(json: &str) -> String {
    match Config::from_json(json) {
        Err(e) => e.to_string(),
        Ok(c) => match c.build(http_client()) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("expected an error for {json}"),
        },
    }
}

#[tokio::test]
async fn every_error_names_the_path_of_its_field() {
    let cases = [
        (r#"{"targets": [{"backend": "a"}], "extra": 1}"#, "extra"),
        (
            r#"{"targets": [{"backend": "a", "wieght": 1}]}"#,
            "targets[0].wieght",
        ),
        (
            r#"{"backends": {"a": {"provider": "azure", "url": "http://x"}}}"#,
            "backends.a.deployment: missing",
        ),
        (
            r#"{"backends": {"a": {"provider": "gemini"}}}"#,
            "backends.a.provider",
        ),
        (
            r#"{"backends": {"a": {"provider": "openai", "url": "ftp://x"}}}"#,
            "backends.a: url",
        ),
        (
            r#"{"backends": {"a": {"provider": "openai", "url": "http://x", "weight": -1}}}"#,
            "backends.a: weight",
        ),
        (
            r#"{"backends": {"a": {"provider": "openai", "url": "http://x", "api_key": "bad\nkey"}}}"#,
            "backends.a.api_key: invalid credential",
        ),
        (
            r#"{"backends": {"a": {"provider": "openai", "url": "http://x", "api_key_env": "TOWER_LLM_LB_NOPE"}}}"#,
            "backends.a.api_key_env: invalid credential: environment variable TOWER_LLM_LB_NOPE is not set",
        ),
        (
            r#"{"targets": [{"backend": "missing"}]}"#,
            "targets[0].backend: no backend named \"missing\"",
        ),
        (
            r#"{"backends": {"a": {"provider": "openai", "url": "http://x"}}, "targets": [{"backend": "a"}, {"backend": "a", "weight": -2}], "strategy": {"mode": "loadbalance"}}"#,
            "targets[1].weight: must be a finite number >= 0",
        ),
        (
            r#"{"backends": {"a": {"provider": "openai", "url": "http://x"}}, "targets": [{"backend": "a"}, {"backend": "a"}]}"#,
            "strategy: required with more than one target",
        ),
        (
            r#"{"strategy": {"mode": "sideways"}, "targets": []}"#,
            "strategy.mode",
        ),
        (
            r#"{"backends": {"a": {"provider": "openai", "url": "http://x"}}, "retry": {"attempts": 0}}"#,
            "retry.attempts: must be >= 1",
        ),
        (
            r#"{"backends": {"a": {"provider": "openai", "url": "http://x"}}, "retry": {"hedge_after_ms": 0}}"#,
            "retry.hedge_after_ms: must be > 0",
        ),
        (
            r#"{"backends": {"a": {"provider": "openai", "url": "http://x"}}, "retry": {"line_interval_ms": 0}}"#,
            "retry.line_interval_ms: must be > 0",
        ),
        (
            r#"{"backends": {"a": {"provider": "openai", "url": "http://x"}}, "retry": {"on_status_codes": [400]}}"#,
            "retry.on_status_codes[0]: only 429 and 5xx",
        ),
        (
            r#"{"backends": {"a": {"provider": "openai", "url": "http://x"}}, "circuit_breaker": {"failure_rate": 2}}"#,
            "circuit_breaker: failure_rate",
        ),
        (
            r#"{"backends": {"a": {"provider": "openai", "url": "http://x"}}, "timeouts": {"idle_ms": 0}}"#,
            "timeouts.idle_ms: must be > 0",
        ),
        (r#"{}"#, "targets: no targets and no backends"),
        (
            r#"{"targets": [{"strategy": {"mode": "fallback"}, "targets": [{"provider": "openai", "url": "http://x", "deployment": "a/b", "backend": "q"}]}]}"#,
            "targets[0].targets[0].provider: give `backend` or an inline provider, not both",
        ),
    ];
    for (json, want) in cases {
        let got = build_err(json);
        assert!(
            got.starts_with(want),
            "for {json}\n  got:  {got}\n  want: {want}…"
        );
    }
}

#[tokio::test]
async fn secrets_never_come_back_out() {
    let json = r#"{"backends": {"a": {"provider": "openai", "url": "http://x", "api_key": "sk-supersecret"}},
                   "gateway": {"client_keys": ["client-secret"]}}"#;
    let config = Config::from_json(json).unwrap();
    let shown = format!("{config:?}");
    assert!(
        !shown.contains("supersecret") && !shown.contains("client-secret"),
        "{shown}"
    );
    let bad = r#"{"backends": {"a": {"provider": "openai", "url": "http://x", "api_key": "sk-super secret"}}}"#;
    let e = build_err(bad);
    assert!(!e.contains("super"), "{e}");
}

#[tokio::test]
async fn json_and_toml_share_one_schema() {
    let east = MockServer::builder()
        .api_key("k")
        .record_requests(true)
        .start()
        .await
        .unwrap();
    let toml = format!(
        r#"
        request_timeout = 30000
        [backends.east]
        provider = "azure"
        url = "{}"
        deployment = "gpt-4o"
        api_key = "k"
        [strategy]
        mode = "fallback"
        [[targets]]
        backend = "east"
        [targets.override_params]
        model = "gpt-4o"
        max_tokens = 100
    "#,
        east.url()
    );
    let c = Config::from_toml(&toml).unwrap();
    let same = Config::from_json(&format!(
        r#"{{ "request_timeout": 30000,
             "backends": {{ "east": {{ "provider": "azure", "url": "{}",
                                     "deployment": "gpt-4o", "api_key": "k" }} }},
             "strategy": {{ "mode": "fallback" }},
             "targets": [ {{ "backend": "east",
                            "override_params": {{ "model": "gpt-4o", "max_tokens": 100 }} }} ] }}"#,
        east.url()
    ))
    .unwrap();
    assert_eq!(format!("{c:?}"), format!("{same:?}"));
    // The TOML's override_params reach the backend.
    let res = c
        .build(http_client())
        .unwrap()
        .oneshot(chat(r#"{"messages":[]}"#))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let sent: serde_json::Value = serde_json::from_slice(&east.requests()[0].body).unwrap();
    assert_eq!(sent["max_tokens"], 100);
    let bad = Config::from_toml("[strategy]\nmode = \"fallback\"\nfoo = 1\n").unwrap_err();
    assert!(
        bad.to_string().starts_with("strategy.foo") || bad.to_string().starts_with("strategy"),
        "{bad}"
    );

    let dir = std::env::temp_dir().join(format!("tower-llm-lb-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("c.toml");
    std::fs::write(&path, &toml).unwrap();
    assert!(Config::from_path(&path).is_ok());
    let yaml = dir.join("c.yaml");
    std::fs::write(&yaml, "x: 1").unwrap();
    assert!(
        Config::from_path(&yaml)
            .unwrap_err()
            .to_string()
            .ends_with("must end in .json or .toml")
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(start_paused = true)]
async fn portkeys_nested_loadbalance_with_a_fallback_arm_behaves_as_written() {
    let openai_a = MockServer::builder()
        .name("openai-a")
        .bearer("sk-a")
        .start()
        .await
        .unwrap();
    let openai_b = MockServer::builder()
        .name("openai-b")
        .bearer("sk-b")
        .start()
        .await
        .unwrap();
    openai_b.set_fault(Some(tower_llm_lb_mock::Fault::Status(500)));
    let azure = MockServer::builder()
        .name("azure")
        .api_key("az")
        .start()
        .await
        .unwrap();
    // Portkey's example: a 50/50 loadbalance whose second target is a fallback from OpenAI to
    // Azure, with inline providers and keys (URLs point at the mocks).
    let json = format!(
        r#"{{
          "strategy": {{ "mode": "loadbalance" }},
          "targets": [
            {{ "provider": "openai", "url": "{a}/v1", "api_key": "sk-a", "weight": 0.5 }},
            {{
              "strategy": {{ "mode": "fallback" }},
              "weight": 0.5,
              "targets": [
                {{ "provider": "openai", "url": "{b}/v1", "api_key": "sk-b" }},
                {{ "provider": "azure-openai", "url": "{z}", "deployment": "gpt-4o", "api_key": "az",
                   "override_params": {{ "model": "gpt-4o" }} }}
              ]
            }}
          ]
        }}"#,
        a = openai_a.url(),
        b = openai_b.url(),
        z = azure.url()
    );
    let svc = Config::from_json(&json)
        .unwrap()
        .build(http_client())
        .unwrap();
    let n = 2000;
    for _ in 0..n {
        let res = svc
            .clone()
            .oneshot(chat(r#"{"model":"gpt-4o-mini"}"#))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    let a = openai_a.counters().ok as f64 / n as f64;
    let z = azure.counters().ok as f64 / n as f64;
    // The pick is weighted random: a share of n draws has a standard deviation of
    // sqrt(0.25 / n) (0.011 at n = 2000). Five of them (0.056) fail about once in two million
    // runs; 0.05 at n = 1000 (3.2 of them) failed a CI run.
    let tolerance = 5.0 * (0.25 / n as f64).sqrt();
    assert!((a - 0.5).abs() < tolerance, "openai-a served {a}");
    assert!(
        (z - 0.5).abs() < tolerance,
        "azure served {z} (the fallback arm)"
    );
    // The fallback arm rewrote the model for Azure only.
    let body: serde_json::Value = serde_json::from_slice(&azure.requests()[0].body).unwrap();
    assert_eq!(body["model"], "gpt-4o");
    let body: serde_json::Value = serde_json::from_slice(&openai_a.requests()[0].body).unwrap();
    assert_eq!(body["model"], "gpt-4o-mini");
    for m in [&openai_a, &openai_b, &azure] {
        assert_eq!(m.counters().foreign_credentials, 0);
        assert_eq!(m.counters().unauthorized, 0);
    }
}

#[tokio::test(start_paused = true)]
async fn backends_alone_are_balanced_by_priority() {
    let ptu = MockServer::builder().name("ptu").start().await.unwrap();
    let paygo = MockServer::builder().name("paygo").start().await.unwrap();
    let json = format!(
        r#"{{ "backends": {{
              "ptu": {{ "provider": "azure", "url": "{p}", "deployment": "gpt-4o", "priority": 0 }},
              "paygo": {{ "provider": "azure", "url": "{g}", "deployment": "gpt-4o", "priority": 1 }} }} }}"#,
        p = ptu.url(),
        g = paygo.url()
    );
    let svc = Config::from_json(&json)
        .unwrap()
        .build(http_client())
        .unwrap();
    for _ in 0..10 {
        let res = svc.clone().oneshot(chat("{}")).await.unwrap();
        assert_eq!(res.status(), 200);
        assert!(res.extensions().get::<ServedPath>().is_none());
    }
    assert_eq!((ptu.counters().ok, paygo.counters().ok), (10, 0));
}

#[tokio::test(start_paused = true)]
async fn keyless_backends_of_one_identity_share_one_token() {
    use tower_llm_lb_mock::MockTokenServer;
    // The secret comes from an environment variable; cargo sets CARGO_PKG_NAME for tests.
    let secret = std::env::var("CARGO_PKG_NAME").unwrap();
    let tokens =
        MockTokenServer::start("app-1", &secret, "h", std::time::Duration::from_secs(3600))
            .await
            .unwrap();
    let east = MockServer::builder()
        .name("east")
        .entra(&tokens)
        .start()
        .await
        .unwrap();
    let west = MockServer::builder()
        .name("west")
        .entra(&tokens)
        .start()
        .await
        .unwrap();
    let entra = format!(
        r#"{{ "type": "client_credentials", "tenant": "t1", "client_id": "app-1",
             "client_secret_env": "CARGO_PKG_NAME", "authority": "{}" }}"#,
        tokens.url()
    );
    let json = format!(
        r#"{{ "backends": {{
              "east": {{ "provider": "azure", "url": "{e}", "deployment": "gpt-4o", "entra": {entra} }},
              "west": {{ "provider": "azure", "url": "{w}", "deployment": "gpt-4o", "entra": {entra} }} }},
             "strategy": {{ "mode": "loadbalance", "algorithm": "round_robin" }},
             "targets": [ {{ "backend": "east" }}, {{ "backend": "west" }} ] }}"#,
        e = east.url(),
        w = west.url()
    );
    let svc = Config::from_json(&json)
        .unwrap()
        .build(http_client())
        .unwrap();
    for _ in 0..10 {
        assert_eq!(svc.clone().oneshot(chat("{}")).await.unwrap().status(), 200);
    }
    assert_eq!((east.counters().ok, west.counters().ok), (5, 5));
    assert_eq!(tokens.fetches(), 1, "one identity, one token");
    let bad = build_err(
        r#"{"backends": {"a": {"provider": "azure", "url": "http://x", "deployment": "d", "api_key": "k", "entra": {"type": "azure_cli"}}}}"#,
    );
    assert_eq!(bad, "backends.a.entra: give a key or entra, not both");
    let bad = build_err(
        r#"{"backends": {"a": {"provider": "azure", "url": "http://x", "deployment": "d", "entra": {"type": "client_credentials", "tenant": "t", "client_id": "c", "client_secret_env": "TOWER_LLM_LB_NOPE"}}}}"#,
    );
    assert_eq!(
        bad,
        "backends.a.entra.client_secret_env: environment variable TOWER_LLM_LB_NOPE is not set"
    );
    let bad = build_err(
        r#"{"backends": {"a": {"provider": "azure", "url": "http://x", "deployment": "d", "entra": {"type": "magic"}}}}"#,
    );
    assert!(bad.starts_with("backends.a.entra"), "{bad}");
}

#[tokio::test(start_paused = true)]
async fn a_config_builds_over_a_client_whose_response_body_is_its_own_type() {
    use http_body_util::BodyExt;
    use http_body_util::combinators::UnsyncBoxBody;
    let mock = MockServer::builder().api_key("k").start().await.unwrap();
    // A user's client, wrapped in a layer that changes the body type.
    let client = tower::ServiceBuilder::new()
        .map_response(|res: http::Response<hyper::body::Incoming>| {
            res.map(|b| UnsyncBoxBody::new(b.map_err(tower_llm_lb::BoxError::from)))
        })
        .service(http_client::<tower_llm_lb::body::ReplayBody>());
    let json = format!(
        r#"{{"backends": {{"a": {{"provider": "azure", "url": "{}", "deployment": "gpt-4o", "api_key": "k"}}}}}}"#,
        mock.url()
    );
    let (svc, backends) = Config::from_json(&json)
        .unwrap()
        .build_over(client)
        .unwrap();
    assert_eq!(backends.len(), 1);
    let res = svc.oneshot(chat("{}")).await.unwrap();
    assert_eq!(res.status(), 200);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(body.starts_with(b"{"));
}

#[tokio::test]
async fn the_readme_s_models_map_parses_and_builds() {
    let json = common::readme_json_after("unlisted models refused with");
    let json = ["AOAI_KEY_01", "AOAI_KEY_02"]
        .iter()
        .fold(json.to_string(), |j, var| j.replace(var, "PATH"));
    let config = Config::from_json(&json).unwrap();
    assert_eq!(
        config.models().collect::<Vec<_>>(),
        ["gpt-4", "gpt-4o", "text-embedding-3-small"]
    );
    let (_, backends) = config.build_with_backends(http_client()).unwrap();
    assert_eq!(backends.len(), 3);
}

#[tokio::test]
async fn the_readme_s_json_config_parses_and_builds() {
    let json = common::readme_json_after("The seed patterns as config:");
    // Its keys come from environment variables; any variable that is set will do here.
    let json = [
        "AOAI_KEY_01",
        "AOAI_KEY_02",
        "AOAI_KEY_03",
        "OPENAI_API_KEY",
    ]
    .iter()
    .fold(json.to_string(), |j, var| j.replace(var, "PATH"));
    let config = Config::from_json(&json).unwrap();
    let (_, backends) = config.build_with_backends(http_client()).unwrap();
    let names: Vec<_> = backends.iter().map(|b| b.name().to_string()).collect();
    assert_eq!(
        names,
        ["east-32k", "openai", "ptu-eastus", "sweden", "westus"],
        "every backend the README names is used"
    );
}

#[tokio::test(start_paused = true)]
async fn a_429_on_one_deployment_does_not_hold_back_another_deployment_of_the_same_resource() {
    // LangChain's gpt-4-8k -> gpt-4-32k on one Azure resource: each deployment has its quota.
    let resource = MockServer::builder().api_key("k").start().await.unwrap();
    let json = format!(
        r#"{{
          "backends": {{ "east": {{ "provider": "azure", "url": "{}", "deployment": "gpt-4-8k", "api_key": "k" }} }},
          "strategy": {{ "mode": "fallback" }},
          "targets": [
            {{ "backend": "east" }},
            {{ "backend": "east", "deployment": "gpt-4-32k", "override_params": {{ "model": "gpt-4-32k" }} }}
          ]
        }}"#,
        resource.url()
    );
    let (svc, backends) = Config::from_json(&json)
        .unwrap()
        .build_with_backends(http_client())
        .unwrap();
    let names: Vec<_> = backends.iter().map(|b| b.name().to_string()).collect();
    assert_eq!(
        names,
        ["east", "east.gpt-4-32k"],
        "both scopes on stats pages"
    );
    // The 8k deployment is out of quota for 30 s; the 32k one is not.
    resource.set_fault(Some(tower_llm_lb_mock::Fault::OnPath(
        "gpt-4-8k".into(),
        Box::new(tower_llm_lb_mock::Fault::Throttle(vec![(
            "retry-after".into(),
            "30".into(),
        )])),
    )));
    for _ in 0..3 {
        let res = svc.clone().oneshot(chat("{}")).await.unwrap();
        assert_eq!(res.status(), 200, "the 32k deployment answers");
    }
    let paths: Vec<_> = resource
        .requests()
        .into_iter()
        .map(|r| r.path_and_query)
        .collect();
    assert_eq!(
        paths.last().unwrap(),
        "/openai/deployments/gpt-4-32k/chat/completions?api-version=2024-10-21"
    );
    // Only the 8k scope is cooling, and it was asked once.
    assert_eq!(resource.counters().throttled, 1);
    assert!(backends[1].state().snapshot().unavailable_until.is_none());
    assert!(backends[0].state().snapshot().unavailable_until.is_some());
}

#[tokio::test(start_paused = true)]
async fn a_configured_health_check_takes_a_failing_backend_out_and_lets_it_back() {
    use std::time::Duration;
    use tower_llm_lb::Circuit;
    use tower_llm_lb_mock::Fault;
    let a = MockServer::builder().api_key("ka").start().await.unwrap();
    let b = MockServer::builder().api_key("kb").start().await.unwrap();
    a.set_fault(Some(Fault::OnPath(
        "/status-check".into(),
        Box::new(Fault::Status(503)),
    )));
    let json = format!(
        r#"{{
          "backends": {{
            "a": {{ "provider": "azure", "url": "{}", "deployment": "d", "api_key": "ka" }},
            "b": {{ "provider": "azure", "url": "{}", "deployment": "d", "api_key": "kb" }}
          }},
          "health_check": {{ "path": "/status-check", "interval_ms": 1000 }}
        }}"#,
        a.url(),
        b.url()
    );
    let (svc, backends) = Config::from_json(&json)
        .unwrap()
        .build_with_backends(http_client())
        .unwrap();
    // Two failed probes, one interval apart: out.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(matches!(
        backends[0].state().snapshot().circuit,
        Circuit::Open { .. }
    ));
    assert_eq!(backends[1].state().snapshot().circuit, Circuit::Closed);
    for _ in 0..10 {
        let res = svc.clone().oneshot(chat("{}")).await.unwrap();
        assert_eq!(res.status(), 200);
    }
    let chats = |m: &MockServer| {
        m.requests()
            .iter()
            .filter(|r| r.path_and_query.contains("chat"))
            .count()
    };
    assert_eq!(chats(&a), 0, "a backend failing its probe takes no traffic");
    // It recovers: the next probe lets it back.
    a.set_fault(None);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(backends[0].state().snapshot().circuit, Circuit::Closed);
    assert!(
        a.requests()
            .iter()
            .all(|r| r.path_and_query == "/status-check" || r.path_and_query.contains("chat"))
    );
    // Probes stop with the stack.
    drop(svc);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = a.counters().requests;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(a.counters().requests, before);
}

#[tokio::test(start_paused = true)]
async fn a_throttled_arm_of_a_nested_group_is_skipped_while_its_sibling_has_room() {
    use std::time::Duration;
    use tower_llm_lb_mock::Fault;
    let mocks: Vec<MockServer> = {
        let mut v = Vec::new();
        for key in ["a1", "a2", "b1", "b2"] {
            v.push(MockServer::builder().api_key(key).start().await.unwrap());
        }
        v
    };
    let json = format!(
        r#"{{
          "backends": {{
            "a1": {{ "provider": "azure", "url": "{}", "deployment": "d", "api_key": "a1" }},
            "a2": {{ "provider": "azure", "url": "{}", "deployment": "d", "api_key": "a2" }},
            "b1": {{ "provider": "azure", "url": "{}", "deployment": "d", "api_key": "b1" }},
            "b2": {{ "provider": "azure", "url": "{}", "deployment": "d", "api_key": "b2" }}
          }},
          "strategy": {{ "mode": "loadbalance" }},
          "targets": [
            {{ "name": "arm-a", "strategy": {{ "mode": "loadbalance" }},
               "targets": [ {{ "backend": "a1" }}, {{ "backend": "a2" }} ] }},
            {{ "name": "arm-b", "strategy": {{ "mode": "fallback" }},
               "targets": [ {{ "backend": "b1" }}, {{ "backend": "b2" }} ] }}
          ]
        }}"#,
        mocks[0].url(),
        mocks[1].url(),
        mocks[2].url(),
        mocks[3].url()
    );
    let svc = Config::from_json(&json)
        .unwrap()
        .build(http_client())
        .unwrap();
    // Arm a is out of quota for 30 s.
    for m in &mocks[..2] {
        m.set_fault(Some(Fault::Throttle(vec![(
            "retry-after".into(),
            "30".into(),
        )])));
    }
    for _ in 0..20 {
        let start = tokio::time::Instant::now();
        let res = svc.clone().oneshot(chat("{}")).await.unwrap();
        assert_eq!(res.status(), 200, "never a 429 while arm b has room");
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "no request waits: {:?}",
            start.elapsed()
        );
    }
    let throttled = mocks[0].counters().throttled + mocks[1].counters().throttled;
    assert!(
        throttled <= 2,
        "arm a asked once per backend, then skipped: {throttled}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_backend_s_own_health_check_replaces_the_group_s_and_thresholds_go_both_ways() {
    use std::time::Duration;
    use tower_llm_lb::Circuit;
    use tower_llm_lb_mock::Fault;
    let a = MockServer::builder().api_key("ka").start().await.unwrap();
    let b = MockServer::builder().api_key("kb").start().await.unwrap();
    let json = format!(
        r#"{{
          "backends": {{
            "a": {{ "provider": "azure", "url": "{}", "deployment": "d", "api_key": "ka",
                    "health_check": {{ "path": "/status-a", "interval_ms": 1000,
                                       "unhealthy_threshold": 3, "healthy_threshold": 2 }} }},
            "b": {{ "provider": "azure", "url": "{}", "deployment": "d", "api_key": "kb" }}
          }},
          "health_check": {{ "path": "/status-all", "interval_ms": 1000 }}
        }}"#,
        a.url(),
        b.url()
    );
    let (_svc, backends) = Config::from_json(&json)
        .unwrap()
        .build_with_backends(http_client())
        .unwrap();
    a.set_fault(Some(Fault::Status(503)));
    // Three failed probes (at 0, 1 and 2 s) take it out, not two.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(backends[0].state().snapshot().circuit, Circuit::Closed);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(matches!(
        backends[0].state().snapshot().circuit,
        Circuit::Open { .. }
    ));
    // Two healthy probes let it back, not one.
    a.set_fault(None);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(matches!(
        backends[0].state().snapshot().circuit,
        Circuit::Open { .. }
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(backends[0].state().snapshot().circuit, Circuit::Closed);
    // Each backend is probed on its own path.
    assert!(a.requests().iter().all(|r| r.path_and_query == "/status-a"));
    assert!(!b.requests().is_empty());
    assert!(
        b.requests()
            .iter()
            .all(|r| r.path_and_query == "/status-all")
    );
}

#[test]
fn an_empty_models_list_is_a_config_error_naming_the_field() {
    let bad = build_err(
        r#"{"backends": {"a": {"provider": "openai", "url": "http://x/v1", "api_key": "k", "models": []}}}"#,
    );
    assert_eq!(
        bad,
        "backends.a.models: must list at least one model, none empty"
    );
    let bad = build_err(
        r#"{"backends": {"a": {"provider": "openai", "url": "http://x/v1", "api_key": "k", "models": ["gpt-4o", " "]}}}"#,
    );
    assert_eq!(
        bad,
        "backends.a.models: must list at least one model, none empty"
    );
}

#[tokio::test(start_paused = true)]
async fn a_reloaded_config_keeps_the_state_of_unchanged_backends() {
    use tower_llm_lb_mock::Fault;
    let a = MockServer::builder()
        .name("a")
        .bearer("ka")
        .start()
        .await
        .unwrap();
    let b = MockServer::builder()
        .name("b")
        .bearer("kb")
        .start()
        .await
        .unwrap();
    a.set_fault(Some(Fault::Throttle(vec![(
        "retry-after".into(),
        "30".into(),
    )])));
    let json = |with_b: bool| {
        let mut backends = format!(
            r#""a": {{ "provider": "openai", "url": "{}/v1", "api_key": "ka" }}"#,
            a.url()
        );
        if with_b {
            backends.push_str(&format!(
                r#", "b": {{ "provider": "openai", "url": "{}/v1", "api_key": "kb" }}"#,
                b.url()
            ));
        }
        format!(r#"{{ "backends": {{ {backends} }}, "retry": {{ "max_wait_ms": 0 }} }}"#)
    };
    let (svc, before) = Config::from_json(&json(false))
        .unwrap()
        .build_with_backends(http_client())
        .unwrap();
    let res = svc.oneshot(chat(r#"{"model":"gpt-4o"}"#)).await.unwrap();
    assert_eq!(res.status(), 429);
    let cooling = before[0]
        .state()
        .snapshot()
        .cooldown_until
        .expect("a asked for 30 s");

    // The reload adds b; a keeps its cooldown (and is not asked again), b starts fresh.
    let (svc, after) = Config::from_json(&json(true))
        .unwrap()
        .build_reusing(http_client(), &before)
        .unwrap();
    let a_after = after.iter().find(|x| x.name() == "a").unwrap();
    assert_eq!(a_after.state().snapshot().cooldown_until, Some(cooling));
    assert_eq!(
        a_after.state().snapshot().counters.throttled,
        1,
        "its counters too"
    );
    let res = svc.oneshot(chat(r#"{"model":"gpt-4o"}"#)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(a.counters().requests, 1, "a is left alone for its 30 s");
    assert_eq!(b.counters().ok, 1);

    // Another URL under the same name is another backend: fresh state.
    let moved = json(false).replace(&a.url(), &b.url());
    let (_, moved) = Config::from_json(&moved)
        .unwrap()
        .build_reusing(http_client(), &after)
        .unwrap();
    assert_eq!(moved[0].state().snapshot().cooldown_until, None);
}

#[test]
fn a_models_map_excludes_top_level_targets_and_strategy_and_names_the_field() {
    let build = |json: &str| {
        Config::from_json(json)
            .and_then(|c| c.build(http_client()).map(|_| ()))
            .unwrap_err()
            .to_string()
    };
    let backends =
        r#""backends": { "a": { "provider": "openai", "url": "http://127.0.0.1:1/v1" } }"#;
    assert_eq!(
        build(&format!(
            r#"{{ {backends}, "models": {{ "m": {{ "backend": "a" }} }}, "targets": [ {{ "backend": "a" }} ] }}"#
        )),
        "models: routes by model in place of `targets`: use one of them"
    );
    assert_eq!(
        build(&format!(
            r#"{{ {backends}, "models": {{ "m": {{ "backend": "a" }} }}, "strategy": {{ "mode": "fallback" }} }}"#
        )),
        "strategy: with `models`, each model's target has its own strategy"
    );
    assert_eq!(
        build(&format!(
            r#"{{ {backends}, "models": {{ "m": {{ "backend": "nope" }} }} }}"#
        )),
        "models.m.backend: no backend named \"nope\" in `backends`"
    );
}

/// LangChain's `with_fallbacks` as users write it: no retries on the first model, retries on
/// the last. Each target's `retry` bounds its own attempts.
#[tokio::test(start_paused = true)]
async fn only_the_last_target_retries_when_only_it_says_so() {
    let first = MockServer::builder().name("first").start().await.unwrap();
    let last = MockServer::builder().name("last").start().await.unwrap();
    for m in [&first, &last] {
        m.set_fault(Some(tower_llm_lb_mock::Fault::Status(500)));
    }
    let json = format!(
        r#"{{ "strategy": {{ "mode": "fallback" }}, "retry": {{ "attempts": 1 }},
             "targets": [
               {{ "provider": "openai", "url": "{f}/v1" }},
               {{ "provider": "openai", "url": "{l}/v1", "retry": {{ "attempts": 3 }} }} ] }}"#,
        f = first.url(),
        l = last.url()
    );
    let svc = Config::from_json(&json)
        .unwrap()
        .build(http_client())
        .unwrap();
    let err = svc.oneshot(chat("{}")).await.unwrap_err();
    // One error listing every attempt: one on the first target, three on the last.
    let ex = err
        .downcast_ref::<tower_llm_lb::error::Exhausted>()
        .expect("Exhausted");
    let on: Vec<&str> = ex.attempts.iter().map(|a| &*a.backend).collect();
    assert_eq!(on, ["openai-0", "openai-1", "openai-1", "openai-1"]);
    assert_eq!(
        first.counters().requests,
        1,
        "the first target does not retry"
    );
    assert_eq!(
        last.counters().requests,
        3,
        "the last one tries three times"
    );
}

#[tokio::test]
async fn a_redis_ca_file_that_cannot_be_read_is_named_by_its_field() {
    let config = Config::from_json(
        r#"{ "backends": { "a": { "provider": "openai", "url": "http://127.0.0.1:9", "api_key": "k" } },
             "shared_state": { "redis_url": "rediss://:pw@127.0.0.1:6380", "redis_ca_file": "/nonexistent/ca.pem" } }"#,
    )
    .unwrap();
    let (_, backends) = config.build_with_backends(http_client()).unwrap();
    let err = config.shared_state(backends).unwrap_err();
    assert_eq!(err.path(), "shared_state.redis_ca_file", "{err}");
    assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    assert!(!format!("{config:?}").contains(":pw@"), "{config:?}");
}
