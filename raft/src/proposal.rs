//! Proposals and the encoding of the entries that carry them.
//!
//! One Raft entry carries a batch of proposals (group commit). Its data is:
//! the format version (one byte, 1), the number of proposals (u32), then
//! for each proposal its 16-byte request id, its length (u32) and its
//! bytes. Integers are big-endian.

use std::fmt;

use crate::error::RaftError;

const FORMAT_VERSION: u8 = 1;
const HEADER_LEN: usize = 1 + 4;
const PROPOSAL_HEADER_LEN: usize = 16 + 4;

/// Identifies one client request. A proposal sent again with the same id,
/// for example after a leader change, must be applied at most once; the
/// state machine gets the id to make sure of it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub [u8; 16]);

impl RequestId {
    /// Returns a new random request id.
    pub fn random() -> RequestId {
        let mut bytes = [0u8; 16];
        // The system random source does not fail on supported platforms;
        // a zero id would still be unique enough for at-most-once.
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
        RequestId(bytes)
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, formatter)
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(formatter, "{byte:02x}")?;
        }
        Ok(())
    }
}

/// One command for the state machine, with the id of the request that
/// proposed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proposal {
    pub request_id: RequestId,
    pub payload: Vec<u8>,
}

impl Proposal {
    pub fn new(request_id: RequestId, payload: Vec<u8>) -> Proposal {
        Proposal { request_id, payload }
    }

    /// Bytes this proposal adds to an entry.
    pub fn encoded_len(&self) -> usize {
        PROPOSAL_HEADER_LEN + self.payload.len()
    }
}

/// Encodes a batch of proposals as the data of one entry.
pub fn encode_batch(proposals: &[Proposal]) -> Vec<u8> {
    let size = HEADER_LEN + proposals.iter().map(Proposal::encoded_len).sum::<usize>();
    let mut bytes = Vec::with_capacity(size);
    bytes.push(FORMAT_VERSION);
    bytes.extend_from_slice(&(proposals.len() as u32).to_be_bytes());
    for proposal in proposals {
        bytes.extend_from_slice(&proposal.request_id.0);
        bytes.extend_from_slice(&(proposal.payload.len() as u32).to_be_bytes());
        bytes.extend_from_slice(&proposal.payload);
    }
    bytes
}

/// Decodes the data of an entry. Empty data (a new leader's entry) is an
/// empty batch.
pub fn decode_batch(index: u64, bytes: &[u8]) -> Result<Vec<Proposal>, RaftError> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    let corrupt = |reason: &str| RaftError::Corrupt(format!("entry {index}: {reason}"));
    let mut reader = Reader { bytes, position: 0 };
    let version = reader.take(1).ok_or_else(|| corrupt("no format version"))?[0];
    if version != FORMAT_VERSION {
        return Err(corrupt(&format!("format version {version} is not {FORMAT_VERSION}")));
    }
    let count = reader.u32().ok_or_else(|| corrupt("no proposal count"))? as usize;
    let mut proposals = Vec::with_capacity(count.min(bytes.len() / PROPOSAL_HEADER_LEN));
    for position in 0..count {
        let id = reader.take(16).ok_or_else(|| corrupt(&format!("proposal {position} has no request id")))?;
        let length = reader.u32().ok_or_else(|| corrupt(&format!("proposal {position} has no length")))? as usize;
        let payload = reader
            .take(length)
            .ok_or_else(|| corrupt(&format!("proposal {position} is shorter than its length {length}")))?;
        let mut request_id = [0u8; 16];
        request_id.copy_from_slice(id);
        proposals.push(Proposal { request_id: RequestId(request_id), payload: payload.to_vec() });
    }
    if reader.position != bytes.len() {
        return Err(corrupt(&format!("{} bytes follow the last proposal", bytes.len() - reader.position)));
    }
    Ok(proposals)
}

struct Reader<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, length: usize) -> Option<&'a [u8]> {
        let end = self.position.checked_add(length)?;
        let slice = self.bytes.get(self.position..end)?;
        self.position = end;
        Some(slice)
    }

    fn u32(&mut self) -> Option<u32> {
        let slice = self.take(4)?;
        Some(u32::from_be_bytes([slice[0], slice[1], slice[2], slice[3]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_round_trips() {
        let proposals = vec![
            Proposal::new(RequestId([1; 16]), b"first".to_vec()),
            Proposal::new(RequestId([2; 16]), Vec::new()),
            Proposal::new(RequestId([3; 16]), vec![0xff; 300]),
        ];
        let bytes = encode_batch(&proposals);
        assert_eq!(bytes.len(), HEADER_LEN + proposals.iter().map(Proposal::encoded_len).sum::<usize>());
        assert_eq!(decode_batch(7, &bytes).expect("decodes"), proposals);
    }

    #[test]
    fn empty_data_is_an_empty_batch() {
        assert!(decode_batch(1, &[]).expect("decodes").is_empty());
    }

    #[test]
    fn truncated_and_padded_batches_are_corrupt() {
        let bytes = encode_batch(&[Proposal::new(RequestId([9; 16]), b"payload".to_vec())]);
        for cut in 1..bytes.len() {
            let error = decode_batch(5, &bytes[..cut]).expect_err("a truncated batch must not decode");
            assert!(error.to_string().contains("entry 5"), "{error}");
        }
        let mut padded = bytes.clone();
        padded.push(0);
        let error = decode_batch(5, &padded).expect_err("trailing bytes must not decode");
        assert!(error.to_string().contains("1 bytes follow"), "{error}");
    }

    #[test]
    fn unknown_version_is_named() {
        let mut bytes = encode_batch(&[]);
        bytes[0] = 9;
        let error = decode_batch(3, &bytes).expect_err("version 9 is unknown");
        assert!(error.to_string().contains("format version 9"), "{error}");
    }
}
