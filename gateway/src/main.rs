//! The `tower-llm-lb` gateway binary; see `tower_llm_lb_gateway::cli`.

fn main() -> std::process::ExitCode {
    tower_llm_lb_gateway::cli::main()
}
