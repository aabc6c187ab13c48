//! A small file-backed state machine for the Raft tests.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use ring::digest;
use sigil_raft::{Proposal, RaftError, StateMachine};

const STATE_FILE: &str = "state";

/// Result of one proposal: the index it was first applied at, and whether
/// this application found it already applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub index: u64,
    pub already: bool,
}

/// Keeps every applied payload in order, in one file rewritten at each
/// apply. A request id is applied at most once.
pub struct FileMachine {
    dir: PathBuf,
    pub applied: u64,
    pub digest: [u8; 32],
    pub requests: BTreeMap<[u8; 16], u64>,
    pub values: Vec<Vec<u8>>,
}

impl FileMachine {
    pub fn open(dir: &Path) -> FileMachine {
        fs::create_dir_all(dir).expect("create machine folder");
        let mut machine = FileMachine {
            dir: dir.to_owned(),
            applied: 0,
            digest: [0; 32],
            requests: BTreeMap::new(),
            values: Vec::new(),
        };
        if let Ok(bytes) = fs::read(dir.join(STATE_FILE)) {
            machine.decode(&bytes);
        }
        machine
    }

    fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&self.applied.to_be_bytes());
        bytes.extend_from_slice(&self.digest);
        bytes.extend_from_slice(&(self.requests.len() as u64).to_be_bytes());
        for (id, index) in &self.requests {
            bytes.extend_from_slice(id);
            bytes.extend_from_slice(&index.to_be_bytes());
        }
        bytes.extend_from_slice(&(self.values.len() as u64).to_be_bytes());
        for value in &self.values {
            bytes.extend_from_slice(&(value.len() as u64).to_be_bytes());
            bytes.extend_from_slice(value);
        }
        bytes
    }

    fn decode(&mut self, bytes: &[u8]) {
        let mut position = 0;
        let mut take = |length: usize| {
            let slice = &bytes[position..position + length];
            position += length;
            slice
        };
        let read_u64 = |slice: &[u8]| u64::from_be_bytes(slice.try_into().expect("8 bytes"));
        self.applied = read_u64(take(8));
        self.digest.copy_from_slice(take(32));
        self.requests.clear();
        for _ in 0..read_u64(take(8)) {
            let id: [u8; 16] = take(16).try_into().expect("16 bytes");
            self.requests.insert(id, read_u64(take(8)));
        }
        self.values.clear();
        for _ in 0..read_u64(take(8)) {
            let length = read_u64(take(8)) as usize;
            self.values.push(take(length).to_vec());
        }
    }

    fn persist(&self) -> Result<(), RaftError> {
        let path = self.dir.join(STATE_FILE);
        let temporary = self.dir.join("state.new");
        fs::write(&temporary, self.encode()).map_err(|error| RaftError::StateMachine(error.to_string()))?;
        fs::rename(&temporary, &path).map_err(|error| RaftError::StateMachine(error.to_string()))
    }
}

impl StateMachine for FileMachine {
    type Output = Applied;

    fn applied_index(&self) -> u64 {
        self.applied
    }

    fn apply(&mut self, index: u64, proposals: &[Proposal]) -> Result<Vec<Applied>, RaftError> {
        assert!(index > self.applied, "index {index} applied twice (applied {})", self.applied);
        let mut outputs = Vec::with_capacity(proposals.len());
        for proposal in proposals {
            if let Some(first) = self.requests.get(&proposal.request_id.0) {
                outputs.push(Applied { index: *first, already: true });
                continue;
            }
            self.requests.insert(proposal.request_id.0, index);
            self.values.push(proposal.payload.clone());
            let mut context = digest::Context::new(&digest::SHA256);
            context.update(&self.digest);
            context.update(&proposal.payload);
            self.digest.copy_from_slice(context.finish().as_ref());
            outputs.push(Applied { index, already: false });
        }
        self.applied = index;
        self.persist()?;
        Ok(outputs)
    }

    fn checkpoint(&mut self, dir: &Path) -> Result<u64, RaftError> {
        fs::create_dir_all(dir).map_err(|error| RaftError::StateMachine(error.to_string()))?;
        fs::write(dir.join(STATE_FILE), self.encode()).map_err(|error| RaftError::StateMachine(error.to_string()))?;
        Ok(self.applied)
    }

    fn restore(&mut self, dir: &Path, index: u64) -> Result<(), RaftError> {
        let bytes = fs::read(dir.join(STATE_FILE)).map_err(|error| RaftError::StateMachine(error.to_string()))?;
        self.decode(&bytes);
        assert_eq!(self.applied, index, "restored checkpoint is at another index");
        self.persist()
    }

    fn sync(&mut self) -> Result<(), RaftError> {
        Ok(())
    }
}
