//! Forwards raft-rs's slog records to `tracing`, with the node id.

use slog::{Drain, Level, OwnedKVList, Record};

struct TracingDrain {
    node_id: u64,
}

impl Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &Record<'_>, _values: &OwnedKVList) -> Result<(), slog::Never> {
        let message = record.msg().to_string();
        let node_id = self.node_id;
        match record.level() {
            Level::Critical | Level::Error => tracing::error!(node_id, target_module = "raft", "{message}"),
            Level::Warning => tracing::warn!(node_id, target_module = "raft", "{message}"),
            Level::Info => tracing::info!(node_id, target_module = "raft", "{message}"),
            Level::Debug => tracing::debug!(node_id, target_module = "raft", "{message}"),
            Level::Trace => tracing::trace!(node_id, target_module = "raft", "{message}"),
        }
        Ok(())
    }
}

pub(crate) fn slog_logger(node_id: u64) -> slog::Logger {
    slog::Logger::root(TracingDrain { node_id }.fuse(), slog::o!())
}
