#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| { let _ = tower_llm_lb::fuzz::translate_round_trip(data); });
