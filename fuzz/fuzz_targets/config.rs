#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tower_llm_lb_config::fuzz::config(data));
