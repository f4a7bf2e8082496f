//! `pinkeeper run`: resolves the settings, sets up logging and the runtime, and hands over to
//! the daemon (`src/daemon/`). Nothing of the daemon's own work happens here.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::cli::node::NodeArgs;
use crate::cli::usage_error;
use crate::config::Overrides;

/// Arguments of `pinkeeper run`.
#[derive(clap::Args)]
pub(crate) struct RunArgs {
    /// The node's settings.
    #[command(flatten)]
    node: NodeArgs,
    /// The operator API's socket [default: /run/pinkeeper/pinkeeper.sock]
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,
    /// Quiet time after the last image event of a K3s start-up before pinkeeper checks that
    /// K3s re-pinned every image whose archive is still there [default: 3000]
    #[arg(long, value_name = "MS")]
    settle_ms: Option<u64>,
    /// Log lines on stderr as text (no colours unless stderr is a terminal) or as one JSON
    /// object per line [default: text]
    #[arg(long, value_name = "FORMAT", value_parser = ["text", "json"])]
    log_format: Option<String>,
    /// Write metrics to this node-exporter textfile-collector file (absolute, ending in
    /// .prom) [default: off]
    #[arg(long, value_name = "PATH")]
    metrics_textfile: Option<PathBuf>,
    /// Serve metrics on this loopback address, e.g. 127.0.0.1:9977 [default: off]
    #[arg(long, value_name = "IP:PORT")]
    metrics_address: Option<String>,
    /// Keep every image whose full name matches this glob (`*`, `?`) pinned, archive or not;
    /// repeat for more patterns; replaces the config file's `keep` [default: none]
    #[arg(long = "keep", value_name = "PATTERN")]
    keep: Vec<String>,
}

fn init_logging(format: crate::config::LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let wanted = std::env::var("PINKEEPER_LOG").unwrap_or_else(|_| "info".into());
    let registry = tracing_subscriber::registry().with(log_filter(&wanted));
    let logs = tracing_subscriber::fmt::layer();
    match format {
        crate::config::LogFormat::Text => {
            // Every control character of an event is escaped (a file name's newline cannot
            // forge a line); colours only on a terminal (src/logging.rs).
            let ansi = std::io::stderr().is_terminal();
            registry
                .with(
                    logs.with_writer(crate::logging::Escaping::new(std::io::stderr, ansi))
                        .with_ansi(ansi),
                )
                .init()
        }
        // One object per line, the event's fields at the top level beside `timestamp`,
        // `level` and `target`: what log shippers (and `kubectl logs | jq`) expect. serde_json
        // escapes control characters itself.
        crate::config::LogFormat::Json => registry
            .with(logs.with_writer(std::io::stderr).json().flatten_event(true))
            .init(),
    }
}

/// What `PINKEEPER_LOG` asks for: a default level and `target=level` directives, comma
/// separated (`info,pinkeeper=debug`); the most specific target wins. The gRPC stack's own
/// debug lines are noise for an operator, so they start at warn, and `PINKEEPER_LOG` can still
/// turn them on by naming them (`h2=debug`); notify says "info" when a watched directory is
/// deleted, which pinkeeper handles. A value that cannot be read means `info`.
fn log_filter(wanted: &str) -> tracing_subscriber::filter::Targets {
    let quiet = "h2=warn,hyper=warn,hyper_util=warn,tower=warn,tonic=warn,notify=warn";
    format!("{quiet},{wanted}")
        .parse()
        .or_else(|_| format!("{quiet},info").parse())
        .unwrap_or_default()
}

/// Runs the daemon until SIGTERM; exit 2 on a bad flag or config file, 1 on a failure.
pub(crate) fn run(args: RunArgs) -> ExitCode {
    let flags = Overrides {
        control_socket: args.control_socket,
        settle_ms: args.settle_ms,
        log_format: args.log_format,
        metrics_textfile: args.metrics_textfile,
        metrics_address: args.metrics_address,
        keep: (!args.keep.is_empty()).then_some(args.keep),
        ..Overrides::default()
    };
    let settings = match args.node.resolve(flags.clone()) {
        Ok(s) => s,
        Err(e) => return usage_error(&e),
    };
    init_logging(settings.log_format);
    let runtime = match crate::runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let engine = crate::engine::Config {
        program_label: settings.program.label().to_string(),
        settle: settings.settle_ms,
        keep: crate::engine::Keep::new(&settings.keep),
        ..Default::default()
    };
    let node = args.node;
    let reload: crate::daemon::Reload = Box::new(move || node.resolve(flags.clone()));
    match runtime.block_on(crate::daemon::run(settings, engine, Some(reload))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Logging goes to stderr: one line says it all.
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use tracing::Level;

    use super::log_filter;

    #[test]
    fn the_log_filter_reads_levels_and_targets() {
        let filter = log_filter("info,pinkeeper=debug");
        assert!(filter.would_enable("pinkeeper::daemon", &Level::DEBUG));
        assert!(!filter.would_enable("redb", &Level::DEBUG));
        assert!(filter.would_enable("redb", &Level::INFO));
        assert!(!filter.would_enable("h2::proto", &Level::INFO));
        let noisy = log_filter("warn,h2=debug");
        assert!(noisy.would_enable("h2::proto", &Level::DEBUG));
        assert!(!noisy.would_enable("pinkeeper", &Level::INFO));
        let unreadable = log_filter("pinkeeper=loud");
        assert!(unreadable.would_enable("pinkeeper", &Level::INFO));
        assert!(!unreadable.would_enable("pinkeeper", &Level::DEBUG));
    }
}
