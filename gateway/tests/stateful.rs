//! Stateful calls over real sockets: a stored response or an uploaded file exists only on the
//! mock that created it (as on the real services), and a follow-up naming it must reach that
//! mock, through this gateway, another replica, or a restarted one.

mod common;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use tower::ServiceExt;
use tower_llm_lb::client::http_client;
use tower_llm_lb_mock::{Fault, MockServer};

/// `(status, backend that answered, body)`.
async fn call(method: &str, url: String, content_type: &str, body: Bytes) -> (u16, String, Value) {
    let req = http::Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", content_type)
        .body(Full::new(body))
        .unwrap();
    let res = http_client().oneshot(req).await.unwrap();
    let status = res.status().as_u16();
    let backend = res
        .headers()
        .get("x-llm-lb-backend")
        .map_or_else(String::new, |v| v.to_str().unwrap().to_string());
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        backend,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

async fn post_json(url: String, body: Value) -> (u16, String, Value) {
    call(
        "POST",
        url,
        "application/json",
        Bytes::from(body.to_string()),
    )
    .await
}

async fn get(url: String) -> (u16, String, Value) {
    call("GET", url, "application/json", Bytes::new()).await
}

/// Two OpenAI-compatible backends in one round-robin group: without pinning, every other
/// follow-up would reach the backend that does not keep its object.
async fn two_backends() -> (MockServer, MockServer, String) {
    let east = MockServer::builder()
        .name("east")
        .bearer("ke")
        .start()
        .await
        .unwrap();
    let west = MockServer::builder()
        .name("west")
        .bearer("kw")
        .start()
        .await
        .unwrap();
    let config = json!({
        "backends": {
            "east": {"provider": "openai", "url": format!("{}/v1", east.url()), "api_key": "ke"},
            "west": {"provider": "openai", "url": format!("{}/v1", west.url()), "api_key": "kw"}
        },
        "strategy": {"mode": "loadbalance", "algorithm": "round_robin"}
    });
    (east, west, config.to_string())
}

#[tokio::test]
async fn a_follow_up_goes_to_the_backend_that_keeps_what_it_names() {
    let (_east, _west, config) = two_backends().await;
    let (gw, _stop) = common::serve_json(&config).await;
    let mut served_by = std::collections::BTreeSet::new();
    for _ in 0..6 {
        let (status, backend, created) = post_json(
            format!("{gw}/v1/responses"),
            json!({"model": "gpt-4o", "input": "hello", "store": true}),
        )
        .await;
        assert_eq!(status, 200, "{created}");
        let id = created["id"].as_str().unwrap().to_string();
        assert!(
            id.starts_with("resp_") && id.ends_with(&format!("~{backend}")),
            "{id}"
        );
        served_by.insert(backend.clone());
        // The next turn, whichever backend the group would pick next.
        let (status, again, next) = post_json(
            format!("{gw}/v1/responses"),
            json!({"model": "gpt-4o", "input": "and then?", "previous_response_id": id}),
        )
        .await;
        assert_eq!((status, &again), (200, &backend), "{next}");
        assert_eq!(
            next["previous_response_id"], id,
            "handed back as the caller knows it"
        );
        let (status, again, stored) = get(format!("{gw}/v1/responses/{id}")).await;
        assert_eq!((status, &again), (200, &backend), "{stored}");
        assert_eq!(stored["id"], id);
    }
    assert_eq!(
        served_by.len(),
        2,
        "created on both backends: {served_by:?}"
    );

    // A streamed turn: the id in its events is tagged too, and the next turn follows it.
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("{gw}/v1/responses"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            json!({"model": "gpt-4o", "input": "hello", "stream": true}).to_string(),
        )))
        .unwrap();
    let res = http_client().oneshot(req).await.unwrap();
    assert_eq!(res.status(), 200);
    let backend = res.headers()["x-llm-lb-backend"]
        .to_str()
        .unwrap()
        .to_string();
    let events = res.into_body().collect().await.unwrap().to_bytes();
    let events = String::from_utf8(events.to_vec()).unwrap();
    let completed = events
        .split("\n\n")
        .find(|e| e.starts_with("event: response.completed"))
        .and_then(|e| e.split_once("data: "))
        .map(|(_, data)| serde_json::from_str::<Value>(data).unwrap())
        .unwrap_or_else(|| panic!("{events}"));
    let id = completed["response"]["id"].as_str().unwrap().to_string();
    assert!(id.ends_with(&format!("~{backend}")), "{events}");
    let (status, again, next) = post_json(
        format!("{gw}/v1/responses"),
        json!({"model": "gpt-4o", "input": "and then?", "previous_response_id": id}),
    )
    .await;
    assert_eq!((status, &again), (200, &backend), "{next}");

    // A file uploaded (a multipart form), then named in a request.
    let boundary = "xyzBOUNDARY";
    let form = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nuser_data\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\nContent-Type: text/plain\r\n\r\nhello\r\n--{boundary}--\r\n"
    );
    let (status, backend, file) = call(
        "POST",
        format!("{gw}/v1/files"),
        &format!("multipart/form-data; boundary={boundary}"),
        Bytes::from(form),
    )
    .await;
    assert_eq!(status, 200, "{file}");
    let file_id = file["id"].as_str().unwrap().to_string();
    assert!(file_id.ends_with(&format!("~{backend}")), "{file_id}");
    for _ in 0..2 {
        let (status, again, got) = get(format!("{gw}/v1/files/{file_id}")).await;
        assert_eq!((status, &again), (200, &backend), "{got}");
        assert_eq!(got["id"], file_id);
    }
}

#[tokio::test]
async fn another_replica_and_a_restarted_gateway_route_a_follow_up_the_same_way() {
    // Replicas as deployed: sharing their backends' state through a real redis-server. The
    // routing of a follow-up needs none of it (the backend is in the id).
    let redis = tower_llm_lb_mock::RedisServer::start(None)
        .unwrap_or_else(|e| panic!("this test needs redis-server: {e}"));
    let (_east, _west, config) = two_backends().await;
    let mut config: Value = serde_json::from_str(&config).unwrap();
    config["shared_state"] = json!({"redis_url": redis.url(), "key_prefix": "stateful"});
    let config = config.to_string();
    let (a, stop_a) = common::serve_json(&config).await;
    let (b, _stop_b) = common::serve_json(&config).await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        let (status, backend, created) = post_json(
            format!("{a}/v1/responses"),
            json!({"model": "gpt-4o", "input": "hello"}),
        )
        .await;
        assert_eq!(status, 200);
        ids.push((created["id"].as_str().unwrap().to_string(), backend));
    }
    // The state is in the id: no store shared between replicas, nothing to recover.
    drop(stop_a);
    let (restarted, _stop) = common::serve_json(&config).await;
    for gw in [&b, &restarted] {
        for (id, backend) in &ids {
            let (status, again, next) = post_json(
                format!("{gw}/v1/responses"),
                json!({"model": "gpt-4o", "input": "more", "previous_response_id": id}),
            )
            .await;
            assert_eq!((status, &again), (200, backend), "{next}");
        }
    }
}

#[tokio::test]
async fn a_follow_up_whose_backend_fails_is_refused_naming_it_and_never_sent_elsewhere() {
    let (east, west, config) = two_backends().await;
    let (gw, _stop) = common::serve_json(&config).await;
    let mut on_east = None;
    while on_east.is_none() {
        let (_, backend, created) = post_json(
            format!("{gw}/v1/responses"),
            json!({"model": "gpt-4o", "input": "hello"}),
        )
        .await;
        if backend == "east" {
            on_east = created["id"].as_str().map(str::to_string);
        }
    }
    let id = on_east.unwrap();
    east.set_fault(Some(Fault::Status(503)));
    let west_before = west.counters().requests;
    // East's own failure comes back, attributed to east (its retries stay on east).
    let (status, backend, error) = get(format!("{gw}/v1/responses/{id}")).await;
    assert_eq!((status, backend.as_str()), (503, "east"), "{error}");
    assert_eq!(west.counters().requests, west_before, "never sent to west");

    // An id naming a backend this gateway does not have.
    let (status, _, error) = get(format!("{gw}/v1/responses/resp_1~north")).await;
    assert_eq!(status, 404, "{error}");
    assert_eq!(error["error"]["code"], "backend_not_found");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("north")
    );
    // Two backends named at once.
    let (status, _, error) = post_json(
        format!("{gw}/v1/responses/resp_1~east/cancel"),
        json!({"previous_response_id": "resp_2~west"}),
    )
    .await;
    assert_eq!(status, 400, "{error}");
}

/// With a config's `models`, a follow-up that names no model (`GET /v1/responses/{id}`) goes to
/// the model's target that holds the object's backend; without that, no model means no target.
#[tokio::test]
async fn a_follow_up_without_a_model_finds_its_backend_among_the_models() {
    let east = MockServer::builder()
        .name("east")
        .bearer("ke")
        .start()
        .await
        .unwrap();
    let west = MockServer::builder()
        .name("west")
        .bearer("kw")
        .start()
        .await
        .unwrap();
    let config = json!({
        "backends": {
            "east": {"provider": "openai", "url": format!("{}/v1", east.url()), "api_key": "ke"},
            "west": {"provider": "openai", "url": format!("{}/v1", west.url()), "api_key": "kw"}
        },
        "models": {"small": {"backend": "east"}, "large": {"backend": "west"}}
    });
    let (gw, _stop) = common::serve_json(&config.to_string()).await;
    for (model, backend) in [("small", "east"), ("large", "west")] {
        let (status, served, created) = post_json(
            format!("{gw}/v1/responses"),
            json!({"model": model, "input": "hello"}),
        )
        .await;
        assert_eq!((status, served.as_str()), (200, backend), "{created}");
        let id = created["id"].as_str().unwrap().to_string();
        let (status, again, stored) = get(format!("{gw}/v1/responses/{id}")).await;
        assert_eq!((status, again.as_str()), (200, backend), "{stored}");
        assert_eq!(stored["id"], id);
    }
}
