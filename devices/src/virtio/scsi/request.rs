//! One virtio-scsi request: the header and CDB in the driver's buffers, the command run by
//! the port's SCSI target, its data moved between guest memory and the medium, and the
//! response (status, sense, residual) written back. Every length comes from the guest and
//! is checked; a request that cannot be parsed is answered, never trusted.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use ferry_storage::{Disk, StorageError};
use virtio_queue::DescriptorChain;
use virtio_queue::{Reader, Writer};
use vm_memory::GuestMemoryMmap;

use super::Port;
use crate::scsi::{Completion, DataOut, IoFailure, MediumIo, MediumIoKind, ScsiResult};

pub const MAX_SENSE: usize = 252;
pub const MAX_CDB: usize = 255;
/// lun[8], tag, task attribute, priority, crn.
const REQ_HEADER: usize = 8 + 8 + 3;
/// sense_len, resid, status_qualifier, status, response.
const RESP_HEADER: usize = 4 + 4 + 2 + 1 + 1;
/// Data moves through a bounce buffer of at most this many bytes at a time.
const CHUNK: usize = 1 << 20;

const S_OK: u8 = 0;
const S_OVERRUN: u8 = 1;
const S_BAD_TARGET: u8 = 3;
const S_FAILURE: u8 = 9;
const S_FUNCTION_COMPLETE: u8 = 0;

const T_TMF: u32 = 0;
const T_AN_QUERY: u32 = 1;
const T_AN_SUBSCRIBE: u32 = 2;

type Chain<'a> = DescriptorChain<&'a GuestMemoryMmap>;

struct ChainDataOut<'r, 'a>(&'r mut Reader<'a>);

impl DataOut for ChainDataOut<'_, '_> {
    fn len(&self) -> usize {
        self.0.available_bytes()
    }
    fn read(&mut self, buf: &mut [u8]) -> usize {
        self.0.read(buf).unwrap_or(0)
    }
}

/// The response fields besides the data.
struct Response {
    response: u8,
    status: u8,
    sense: Vec<u8>,
    resid: u32,
}

impl Response {
    fn transport(response: u8) -> Self {
        Self {
            response,
            status: 0,
            sense: Vec::new(),
            resid: 0,
        }
    }
}

/// Runs the command in `chain`; returns the bytes written to the driver's buffers.
pub fn command(
    chain: Chain<'_>,
    mem: &GuestMemoryMmap,
    ports: &mut BTreeMap<u8, Port>,
    cdb_size: usize,
    sense_size: usize,
) -> u32 {
    let (Ok(mut reader), Ok(mut writer)) = (chain.clone().reader(mem), chain.writer(mem)) else {
        return 0;
    };
    let sense_size = sense_size.min(MAX_SENSE);
    let resp_len = RESP_HEADER + sense_size;
    if writer.available_bytes() < resp_len {
        // No room even for the response: nothing sensible can be said.
        return 0;
    }
    let Ok(mut data_in) = writer.split_at(resp_len) else {
        return 0;
    };
    let mut header = vec![0u8; REQ_HEADER + cdb_size.min(MAX_CDB)];
    let response = if reader.read_exact(&mut header).is_err() {
        Response::transport(S_FAILURE)
    } else {
        let lun = &header[0..8];
        let cdb = &header[REQ_HEADER..];
        match address(lun).and_then(|(t, l)| ports.get_mut(&t).map(|p| (p, l))) {
            None => Response::transport(S_BAD_TARGET),
            Some((port, unit)) => run(port, unit, cdb, &mut reader, &mut data_in),
        }
    };
    let mut resp = Vec::with_capacity(resp_len);
    let sense = &response.sense[..response.sense.len().min(sense_size)];
    resp.extend_from_slice(&(sense.len() as u32).to_le_bytes());
    resp.extend_from_slice(&response.resid.to_le_bytes());
    resp.extend_from_slice(&0u16.to_le_bytes());
    resp.push(response.status);
    resp.push(response.response);
    resp.extend_from_slice(sense);
    resp.resize(resp_len, 0);
    if writer.write_all(&resp).is_err() {
        return 0;
    }
    (writer.bytes_written() + data_in.bytes_written()) as u32
}

/// The target and LUN of a virtio-scsi LUN field: 1, target, then a flat-space LUN.
fn address(lun: &[u8]) -> Option<(u8, u16)> {
    match lun {
        [1, target, hi, lo, ..] => Some((*target, (u16::from(*hi & 0x3f) << 8) | u16::from(*lo))),
        _ => None,
    }
}

fn run(
    port: &mut Port,
    lun: u16,
    cdb: &[u8],
    reader: &mut Reader<'_>,
    data_in: &mut Writer<'_>,
) -> Response {
    let in_capacity = data_in.available_bytes();
    let result = port.target.execute(lun, cdb, &mut ChainDataOut(reader));
    let completion = match result {
        ScsiResult::Complete(c) => c,
        ScsiResult::Io(io) => {
            let (outcome, short) = match &port.medium {
                Some(disk) => perform(disk, &io, reader, data_in),
                None => (Err(IoFailure::Other), false),
            };
            if short {
                return Response::transport(S_OVERRUN);
            }
            port.target.io_done(lun, &io, outcome)
        }
    };
    finish(completion, data_in, in_capacity)
}

fn finish(c: Completion, data_in: &mut Writer<'_>, in_capacity: usize) -> Response {
    let n = c.data_in.len().min(data_in.available_bytes());
    let _ = data_in.write_all(&c.data_in[..n]);
    let moved = data_in.bytes_written();
    Response {
        response: S_OK,
        status: c.status.code(),
        sense: c
            .sense
            .map(|s| s.fixed_format().to_vec())
            .unwrap_or_default(),
        resid: in_capacity.saturating_sub(moved) as u32,
    }
}

fn failure(e: &StorageError) -> IoFailure {
    tracing::warn!("virtio-scsi: {e}");
    match e {
        StorageError::Io { source, .. } if source.kind() == std::io::ErrorKind::StorageFull => {
            tracing::error!(
                "the host disk is full: free space on it; the guest sees write errors until then"
            );
            IoFailure::NoSpace
        }
        _ => IoFailure::Medium,
    }
}

/// Moves the data of a medium transfer; the flag says the guest's buffers were too short.
fn perform(
    disk: &Disk,
    io: &MediumIo,
    reader: &mut Reader<'_>,
    data_in: &mut Writer<'_>,
) -> (Result<(), IoFailure>, bool) {
    let len = io.len as usize;
    let r = match &io.kind {
        MediumIoKind::Read => {
            if data_in.available_bytes() < len {
                return (Ok(()), true);
            }
            let mut buf = vec![0u8; len.min(CHUNK)];
            let mut done = 0usize;
            while done < len {
                let n = (len - done).min(CHUNK);
                if let Err(e) = disk.read_at(&mut buf[..n], io.offset + done as u64) {
                    return (Err(failure(&e)), false);
                }
                if data_in.write_all(&buf[..n]).is_err() {
                    return (Err(IoFailure::Other), false);
                }
                done += n;
            }
            Ok(())
        }
        MediumIoKind::Write => {
            if reader.available_bytes() < len {
                return (Ok(()), true);
            }
            let mut buf = vec![0u8; len.min(CHUNK)];
            let mut done = 0usize;
            while done < len {
                let n = (len - done).min(CHUNK);
                if reader.read_exact(&mut buf[..n]).is_err() {
                    return (Err(IoFailure::Other), false);
                }
                if let Err(e) = disk.write_at(&buf[..n], io.offset + done as u64) {
                    return (Err(failure(&e)), false);
                }
                done += n;
            }
            Ok(())
        }
        MediumIoKind::WriteZeroes => {
            let buf = vec![0u8; len.min(CHUNK)];
            let mut done = 0usize;
            while done < len {
                let n = (len - done).min(CHUNK);
                if let Err(e) = disk.write_at(&buf[..n], io.offset + done as u64) {
                    return (Err(failure(&e)), false);
                }
                done += n;
            }
            Ok(())
        }
        MediumIoKind::Flush => disk.flush().map_err(|e| failure(&e)),
        MediumIoKind::Discard(ranges) => ranges
            .iter()
            .try_for_each(|&(off, n)| disk.discard(off, n))
            .map_err(|e| failure(&e)),
    };
    (r, false)
}

/// A control-queue request: task management and asynchronous-notification setup.
pub fn control(chain: Chain<'_>, mem: &GuestMemoryMmap) -> u32 {
    let (Ok(mut reader), Ok(mut writer)) = (chain.clone().reader(mem), chain.writer(mem)) else {
        return 0;
    };
    let mut kind = [0u8; 4];
    if reader.read_exact(&mut kind).is_err() {
        return 0;
    }
    let reply: Vec<u8> = match u32::from_le_bytes(kind) {
        // Commands complete before their request is used, so nothing is ever in flight to
        // abort or reset: every task-management function is complete at once.
        T_TMF => vec![S_FUNCTION_COMPLETE],
        // No asynchronous events are offered (event_actual 0).
        T_AN_QUERY | T_AN_SUBSCRIBE => {
            let mut r = 0u32.to_le_bytes().to_vec();
            r.push(S_OK);
            r
        }
        _ => return 0,
    };
    if writer.available_bytes() < reply.len() || writer.write_all(&reply).is_err() {
        return 0;
    }
    reply.len() as u32
}

#[cfg(test)]
mod tests {
    use super::address;

    #[test]
    fn lun_addressing() {
        assert_eq!(address(&[1, 3, 0x40, 2, 0, 0, 0, 0]), Some((3, 2)));
        assert_eq!(address(&[1, 0, 0, 0, 0, 0, 0, 0]), Some((0, 0)));
        assert_eq!(address(&[0, 0, 0, 0, 0, 0, 0, 0]), None);
    }
}
