#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tower_llm_lb::fuzz::run(tower_llm_lb::fuzz::Target::RateLimitHeaders, data);
});
