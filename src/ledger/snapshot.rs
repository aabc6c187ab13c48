//! Checkpoints of the whole ledger and restores from them, which Raft uses
//! as snapshots.
//!
//! A restore swaps folders next to the ledger folder `NAME`: the current
//! database moves aside to `NAME.restore-old`, and a checkpoint on another
//! filesystem is copied to `NAME.restore-new` before it is renamed into
//! place, so `NAME` contains either the old or the whole new database.

use std::fs::{self, File};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use super::error::LedgerError;
use super::machine::StateMachine;
use super::store::{LedgerState, OpenMode, Store};

/// The file operation that put the checkpoint at the ledger path, which a
/// failed restore undoes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    Moved,
    Copied,
}

/// The ledger folder and the folders a restore uses next to it.
struct RestoreFolders {
    path: PathBuf,
    previous: PathBuf,
    incoming: PathBuf,
}

impl StateMachine {
    /// Writes a checkpoint of the state at the applied index into `dir`,
    /// which must not exist, and returns that index.
    pub(crate) fn checkpoint(&self, dir: &Path) -> Result<u64, LedgerError> {
        let operation = || format!("create ledger checkpoint at {}", dir.display());
        if dir.try_exists().map_err(|cause| LedgerError::filesystem(operation(), &cause))? {
            return Err(LedgerError::Filesystem {
                operation: operation(),
                reason: "the path already exists, choose one that does not".to_owned(),
            });
        }

        // Holding the write lock keeps entries out of the checkpoint that
        // the returned index does not cover.
        let _writes = self.lock_writes()?;
        let applied_index = self.committed_state().applied_index;
        self.with_store(|store| store.create_checkpoint(dir))?;
        tracing::info!(dir = %dir.display(), applied_index, "created ledger checkpoint");
        Ok(applied_index)
    }

    /// Replaces the whole database with the checkpoint in `dir`. On success
    /// `dir` is consumed: moved into place, or copied and then removed when
    /// it is on another filesystem. On failure the previous database is
    /// open again and `dir` stays where it was.
    pub(crate) fn restore(&self, dir: &Path) -> Result<(), LedgerError> {
        check_checkpoint_dir(dir, &self.path)?;
        let folders = RestoreFolders::new(&self.path)?;

        let mut writes = self.lock_writes_for_restore();
        let mut store = self.lock_store_exclusive();
        folders.remove_leftovers()?;
        // The database is closed before its folder moves, because RocksDB
        // creates new files by path and would write them into the folder
        // that replaces it.
        drop(store.take());

        let (restored, state) = match folders.swap_in(dir) {
            Ok(opened) => opened,
            Err(error) => {
                *store = self.reopen_previous();
                return Err(error);
            }
        };
        *store = Some(restored);
        self.set_committed_state(state);
        writes.halted_at = None;
        drop(store);
        drop(writes);

        folders.remove_previous();
        self.bundle_changed(state.applied_index);
        tracing::info!(
            path = %self.path.display(),
            checkpoint = %dir.display(),
            applied_index = state.applied_index,
            digest = %hex::encode(state.digest),
            "restored ledger from checkpoint"
        );
        Ok(())
    }

    fn reopen_previous(&self) -> Option<Store> {
        match Store::open(&self.path, OpenMode::Existing) {
            Ok((store, state)) => {
                self.set_committed_state(state);
                Some(store)
            }
            Err(error) => {
                tracing::error!(
                    path = %self.path.display(),
                    %error,
                    "failed to reopen the previous ledger after a failed restore; reads and writes fail until the \
                     ledger is opened again"
                );
                None
            }
        }
    }
}

/// Moves the previous ledger folder back when a restore stopped after it
/// moved the folder aside and before the checkpoint took its place.
pub(crate) fn recover_interrupted_restore(path: &Path) -> Result<(), LedgerError> {
    let Ok(folders) = RestoreFolders::new(path) else {
        return Ok(());
    };
    if !exists(&folders.previous)? {
        return Ok(());
    }
    if exists(path)? {
        tracing::warn!(
            path = %path.display(),
            previous = %folders.previous.display(),
            "found the previous ledger of an interrupted restore next to the restored one; \
             the next restore removes it, or delete it by hand"
        );
        return Ok(());
    }
    rename(&folders.previous, path)?;
    tracing::warn!(path = %path.display(), "moved the ledger back into place after an interrupted restore");
    Ok(())
}

impl RestoreFolders {
    fn new(path: &Path) -> Result<RestoreFolders, LedgerError> {
        let name = path.file_name().ok_or_else(|| LedgerError::Filesystem {
            operation: format!("restore ledger at {}", path.display()),
            reason: "the ledger path does not end in a folder name".to_owned(),
        })?;
        let sibling = |suffix: &str| {
            let mut sibling_name = name.to_os_string();
            sibling_name.push(suffix);
            path.with_file_name(sibling_name)
        };
        Ok(RestoreFolders {
            path: path.to_owned(),
            previous: sibling(".restore-old"),
            incoming: sibling(".restore-new"),
        })
    }

    /// Removes the folders that an interrupted restore left behind. The
    /// ledger at `path` is open, so they contain nothing it needs.
    fn remove_leftovers(&self) -> Result<(), LedgerError> {
        for folder in [&self.previous, &self.incoming] {
            if exists(folder)? {
                tracing::warn!(folder = %folder.display(), "removing a folder left by an interrupted restore");
                remove_folder(folder)?;
            }
        }
        Ok(())
    }

    /// Moves the closed database aside, puts the checkpoint in its place and
    /// opens it. On failure, it puts the previous database back.
    fn swap_in(&self, checkpoint: &Path) -> Result<(Store, LedgerState), LedgerError> {
        rename(&self.path, &self.previous)?;
        let placement = match self.place_checkpoint(checkpoint) {
            Ok(placement) => placement,
            Err(error) => {
                self.put_previous_back();
                return Err(error);
            }
        };

        match Store::open(&self.path, OpenMode::Existing) {
            Ok(opened) => {
                if placement == Placement::Copied
                    && let Err(error) = remove_folder(checkpoint)
                {
                    tracing::warn!(%error, "failed to remove the checkpoint after copying it; delete it by hand");
                }
                sync_parent(&self.path);
                Ok(opened)
            }
            Err(error) => {
                self.take_back(checkpoint, placement);
                self.put_previous_back();
                Err(error)
            }
        }
    }

    /// Renames the checkpoint to the ledger path, or copies it when it is on
    /// another filesystem.
    fn place_checkpoint(&self, checkpoint: &Path) -> Result<Placement, LedgerError> {
        match fs::rename(checkpoint, &self.path) {
            Ok(()) => Ok(Placement::Moved),
            Err(cause) if cause.kind() == ErrorKind::CrossesDevices => {
                if let Err(error) = copy_files(checkpoint, &self.incoming) {
                    // The copy is incomplete and the error is already known,
                    // so a failed removal is only logged.
                    if let Err(remove_error) = remove_folder(&self.incoming) {
                        tracing::warn!(error = %remove_error, "failed to remove an incomplete checkpoint copy");
                    }
                    return Err(error);
                }
                rename(&self.incoming, &self.path)?;
                Ok(Placement::Copied)
            }
            Err(cause) => Err(rename_error(checkpoint, &self.path, &cause)),
        }
    }

    /// Undoes `place_checkpoint` after the checkpoint failed to open.
    fn take_back(&self, checkpoint: &Path, placement: Placement) {
        let result = match placement {
            Placement::Moved => rename(&self.path, checkpoint),
            Placement::Copied => remove_folder(&self.path),
        };
        if let Err(error) = result {
            tracing::error!(%error, "failed to move away the checkpoint that did not open");
        }
    }

    fn put_previous_back(&self) {
        if let Err(error) = rename(&self.previous, &self.path) {
            tracing::error!(
                %error,
                previous = %self.previous.display(),
                "failed to move the previous ledger back after a failed restore; it stays at the previous path"
            );
        }
    }

    fn remove_previous(&self) {
        if let Err(error) = remove_folder(&self.previous) {
            tracing::warn!(%error, "failed to remove the previous ledger folder after a restore; delete it by hand");
        }
    }
}

fn check_checkpoint_dir(dir: &Path, ledger_path: &Path) -> Result<(), LedgerError> {
    let operation = || format!("restore ledger from checkpoint {}", dir.display());
    let metadata = fs::metadata(dir).map_err(|cause| LedgerError::filesystem(operation(), &cause))?;
    if !metadata.is_dir() {
        return Err(LedgerError::Filesystem { operation: operation(), reason: "the path is not a folder".to_owned() });
    }
    let canonical_dir = fs::canonicalize(dir).map_err(|cause| LedgerError::filesystem(operation(), &cause))?;
    let canonical_ledger =
        fs::canonicalize(ledger_path).map_err(|cause| LedgerError::filesystem(operation(), &cause))?;
    if canonical_dir.starts_with(&canonical_ledger) {
        return Err(LedgerError::Filesystem {
            operation: operation(),
            reason: format!("the checkpoint is inside the ledger folder {}", ledger_path.display()),
        });
    }
    Ok(())
}

/// Copies the files of a checkpoint folder, which has no subfolders, and
/// syncs them.
fn copy_files(from: &Path, to: &Path) -> Result<(), LedgerError> {
    let operation = || format!("copy checkpoint {} to {}", from.display(), to.display());
    fs::create_dir(to).map_err(|cause| LedgerError::filesystem(operation(), &cause))?;
    let entries = fs::read_dir(from).map_err(|cause| LedgerError::filesystem(operation(), &cause))?;
    for entry in entries {
        let entry = entry.map_err(|cause| LedgerError::filesystem(operation(), &cause))?;
        let file_type = entry.file_type().map_err(|cause| LedgerError::filesystem(operation(), &cause))?;
        if !file_type.is_file() {
            return Err(LedgerError::Filesystem {
                operation: operation(),
                reason: format!("{} is not a regular file", entry.path().display()),
            });
        }
        let target = to.join(entry.file_name());
        fs::copy(entry.path(), &target).map_err(|cause| LedgerError::filesystem(operation(), &cause))?;
        sync_path(&target).map_err(|cause| LedgerError::filesystem(operation(), &cause))?;
    }
    sync_path(to).map_err(|cause| LedgerError::filesystem(operation(), &cause))
}

fn exists(path: &Path) -> Result<bool, LedgerError> {
    path.try_exists().map_err(|cause| LedgerError::filesystem(format!("check {}", path.display()), &cause))
}

fn rename(from: &Path, to: &Path) -> Result<(), LedgerError> {
    fs::rename(from, to).map_err(|cause| rename_error(from, to, &cause))
}

fn rename_error(from: &Path, to: &Path, cause: &std::io::Error) -> LedgerError {
    LedgerError::filesystem(format!("move {} to {}", from.display(), to.display()), cause)
}

fn remove_folder(path: &Path) -> Result<(), LedgerError> {
    fs::remove_dir_all(path).map_err(|cause| LedgerError::filesystem(format!("remove {}", path.display()), &cause))
}

fn sync_path(path: &Path) -> std::io::Result<()> {
    File::open(path)?.sync_all()
}

/// Syncs the folder that contains `path`, so the renames survive a power
/// loss. A failure is logged, because the restored database is already open.
fn sync_parent(path: &Path) {
    let Some(parent) = path.parent() else {
        return;
    };
    let parent = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
    if let Err(error) = sync_path(parent) {
        tracing::warn!(folder = %parent.display(), %error, "failed to sync the ledger's parent folder after a restore");
    }
}
