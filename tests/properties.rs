//! Stable property tests over every parser that reads bytes a backend or a user controls: the
//! same entry points (`tower_llm_lb::fuzz`, feature `fuzzing`) the `cargo fuzz` targets in
//! `fuzz/` call, fed by proptest instead of libFuzzer. Each property panics on a broken
//! invariant (a panic, a wait over its cap, an answer that depends on how bytes were chunked).
//! `PROPTEST_CASES` raises the count (CI runs the default below).

#![cfg(feature = "fuzzing")]

use proptest::prelude::*;
use tower_llm_lb::fuzz;

fn cases() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(2048);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

/// Bytes that look like what the parsers read: mostly header, JSON and SSE text.
fn texty() -> impl Strategy<Value = Vec<u8>> {
    let token = prop_oneof![
        Just(b"data: ".to_vec()),
        Just(b"event: error\n".to_vec()),
        Just(b"\n\n".to_vec()),
        Just(b"[DONE]".to_vec()),
        Just(b"message_stop".to_vec()),
        Just(br#"{"error":{"message":"overloaded","type":"rate_limit"}}"#.to_vec()),
        Just(br#"{"choices":[{"delta":{"content":"hi"}}]}"#.to_vec()),
        Just(br#""model":"gpt-4o""#.to_vec()),
        Just(br#""max_tokens": 99999999999999999999"#.to_vec()),
        Just(b"{ \"error\" : ".to_vec()),
        Just(b"Sun, 06 Nov 1994 08:49:37 GMT".to_vec()),
        Just(b"Fri, 31 Dec 9999 23:59:59 GMT".to_vec()),
        Just(b"18446744073709551616".to_vec()),
        Just(b"-5".to_vec()),
        Just(b"1.5s".to_vec()),
        Just(b"6m0s".to_vec()),
        Just(b"2026-11-30T17:00:00Z".to_vec()),
        proptest::collection::vec(any::<u8>(), 0..8),
    ];
    proptest::collection::vec(token, 0..24).prop_map(|parts| parts.concat())
}

/// Either raw bytes or text-like bytes, behind a prefix of structure bytes (the entry points
/// read their choices off the front).
fn input() -> impl Strategy<Value = Vec<u8>> {
    (
        proptest::collection::vec(any::<u8>(), 0..40),
        prop_oneof![proptest::collection::vec(any::<u8>(), 0..256), texty()],
    )
        .prop_map(|(head, tail)| [head, tail].concat())
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn rate_limit_and_wait_headers(data in input()) {
        fuzz::rate_limit_headers(&data);
    }

    #[test]
    fn sse_streams_in_any_chunks(data in input()) {
        fuzz::sse_stream(&data);
    }

    #[test]
    fn json_answer_and_error_bodies(data in prop_oneof![texty(), proptest::collection::vec(any::<u8>(), 0..256)]) {
        fuzz::json_body(&data);
    }

    #[test]
    fn configs_as_text_and_as_mutations_of_a_valid_one(data in input()) {
        fuzz::config(&data);
    }

    #[test]
    fn redaction_leaves_no_secret(data in input()) {
        fuzz::redaction(&data);
    }
}

/// A few inputs that once broke an invariant, or would have, replayed as they are.
#[test]
fn known_hostile_inputs() {
    // Found by `cargo fuzz run rate_limit_headers`: a 777 µs wait (from an RFC 3339 reset)
    // was passed on as `retry-after-ms: 0`, "now".
    fuzz::rate_limit_headers(&[
        0x00, 0x0e, 0xa8, 0x60, 0x02, 0x60, 0x02, 0x30, 0x3f, 0x30, 0x86, 0x00, 0x34, 0x2f, 0x3c,
        0x3c, 0x3c, 0x3c, 0x3c, 0x36, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x32, 0x37,
        0x37, 0x37, 0x37, 0x2e, 0x37, 0x37, 0x37, 0x37, 0x37, 0x37, 0x31, 0x31, 0x2d, 0xe4, 0xff,
        0xff,
    ]);
    for body in [
        &br#"{"error":{"message":"x"}}"#[..],
        br#"  {  "error"  :  {}"#,
        br#"{"err"#,
        br#"{"errors":{}}"#,
        b"",
    ] {
        fuzz::json_body(body);
    }
}
