#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = tower_llm_lb::fuzz::run(tower_llm_lb::fuzz::Target::TranslateRoundTrip, data);
});
