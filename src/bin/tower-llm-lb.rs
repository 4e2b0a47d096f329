//! The `tower-llm-lb` gateway binary; see `tower_llm_lb::gateway::cli`.

fn main() -> std::process::ExitCode {
    tower_llm_lb::gateway::cli::main()
}
