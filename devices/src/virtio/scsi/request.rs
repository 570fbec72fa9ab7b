//! One virtio-scsi request: the header and CDB in the driver's buffers, the command run by
//! the port's SCSI target, its data moved between guest memory and the medium, and the
//! response (status, sense, residual) written back. Every length comes from the guest and
//! is checked; a request that cannot be parsed is answered, never trusted.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};

use ferry_storage::io::{IoError, Request};
use ferry_storage::Disk;
use virtio_queue::DescriptorChain;
use virtio_queue::{Reader, Writer};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

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
const S_ABORTED: u8 = 2;
const S_BAD_TARGET: u8 = 3;
const S_RESET: u8 = 4;
const S_FAILURE: u8 = 9;
const S_FUNCTION_COMPLETE: u8 = 0;
const S_FUNCTION_SUCCEEDED: u8 = 10;
const S_FUNCTION_REJECTED: u8 = 11;
const S_INCORRECT_LUN: u8 = 12;

/// Task-management function subtypes (virtio_scsi_ctrl_tmf.subtype).
const TMF_ABORT_TASK: u32 = 0;
const TMF_ABORT_TASK_SET: u32 = 1;
const TMF_CLEAR_TASK_SET: u32 = 3;
const TMF_I_T_NEXUS_RESET: u32 = 4;
const TMF_LOGICAL_UNIT_RESET: u32 = 5;
const TMF_QUERY_TASK: u32 = 6;
const TMF_QUERY_TASK_SET: u32 = 7;

const T_TMF: u32 = 0;
const T_AN_QUERY: u32 = 1;
const T_AN_SUBSCRIBE: u32 = 2;

type Chain<'a> = DescriptorChain<&'a GuestMemoryMmap>;
/// Guest memory pieces: (address, length).
type Sg = Vec<(GuestAddress, usize)>;

/// What became of a request: answered now (the bytes written to the driver's buffers), or
/// handed to the port's I/O engine and answered when it completes.
pub enum Handled {
    Done(u32),
    Queued,
}

/// A command whose data moves through an I/O engine.
pub struct InFlight {
    pub queue: usize,
    pub head: u16,
    pub port: u8,
    lun: u16,
    /// The driver's tag for the command, which task management names it by.
    tag: u64,
    /// Set by task management: the command is answered with this response (ABORTED or
    /// RESET) once its transfer has finished on the host.
    cancelled: Option<u8>,
    io: MediumIo,
    /// Where the response goes, and how much Data-In room the driver gave.
    resp: Sg,
    in_capacity: usize,
    /// A FUA write waits for the flush that follows it.
    flushing: bool,
}

/// Requests in flight on every port's engine, by the engine's user_data, and the
/// task-management requests waiting for some of them.
#[derive(Default)]
pub struct InFlightSet {
    next: u64,
    map: HashMap<u64, InFlight>,
    tmfs: Vec<PendingTmf>,
}

/// A task-management request answered once the commands it cancelled have finished on the
/// host: a driver that heard "complete" earlier would reuse buffers still being filled.
struct PendingTmf {
    head: u16,
    resp: Sg,
    waits_for: Vec<u64>,
    response: u8,
}

impl InFlightSet {
    pub fn clear(&mut self) {
        self.map.clear();
        self.tmfs.clear();
    }

    /// Drops the commands of a port whose engine is gone: nothing will complete them, and
    /// task management must not wait for them.
    pub fn forget_port(&mut self, port: u8) {
        self.map.retain(|_, e| e.port != port);
    }

    /// Answers the task-management requests whose commands are all done; returns (head,
    /// used length) for each.
    pub fn finish_tmfs(&mut self, mem: &GuestMemoryMmap) -> Vec<(u16, u32)> {
        let map = &self.map;
        let mut done = Vec::new();
        self.tmfs.retain_mut(|t| {
            t.waits_for.retain(|id| map.contains_key(id));
            if !t.waits_for.is_empty() {
                return true;
            }
            let used = if write_sg(mem, &t.resp, &[t.response]) {
                1
            } else {
                0
            };
            done.push((t.head, used));
            false
        });
        done
    }
}

/// The first `skip` bytes of `descs` dropped, then at most `take` bytes.
fn sg_range(descs: impl Iterator<Item = (GuestAddress, usize)>, skip: usize, take: usize) -> Sg {
    let mut out = Vec::new();
    let (mut skip, mut take) = (skip, take);
    for (addr, len) in descs {
        if take == 0 {
            break;
        }
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = (len - skip).min(take);
        out.push((GuestAddress(addr.0.wrapping_add(skip as u64)), n));
        take -= n;
        skip = 0;
    }
    out
}

/// A chain's device-writable (`write`) or device-readable buffers, in order.
fn descriptors<'a>(
    chain: &Chain<'a>,
    write: bool,
) -> impl Iterator<Item = (GuestAddress, usize)> + 'a {
    chain
        .clone()
        .filter(move |d| d.is_write_only() == write)
        .map(|d| (d.addr(), d.len() as usize))
}

fn sg_len(sg: &Sg) -> usize {
    sg.iter().map(|&(_, l)| l).sum()
}

/// Writes `data` over `sg` (guest memory checked by vm-memory); false if any piece failed.
fn write_sg(mem: &GuestMemoryMmap, sg: &Sg, data: &[u8]) -> bool {
    let mut rest = data;
    for &(addr, len) in sg {
        if rest.is_empty() {
            break;
        }
        let n = len.min(rest.len());
        if mem.write_slice(&rest[..n], addr).is_err() {
            return false;
        }
        rest = &rest[n..];
    }
    true
}

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
    /// virtio_scsi_cmd_resp in `resp_len` bytes; the sense is cut to the room there is.
    fn encode(&self, resp_len: usize) -> Vec<u8> {
        let sense = &self.sense[..self.sense.len().min(resp_len.saturating_sub(RESP_HEADER))];
        let mut resp = Vec::with_capacity(resp_len);
        resp.extend_from_slice(&(sense.len() as u32).to_le_bytes());
        resp.extend_from_slice(&self.resid.to_le_bytes());
        resp.extend_from_slice(&0u16.to_le_bytes());
        resp.push(self.status);
        resp.push(self.response);
        resp.extend_from_slice(sense);
        resp.resize(resp_len, 0);
        resp
    }

    fn transport(response: u8) -> Self {
        Self {
            response,
            status: 0,
            sense: Vec::new(),
            resid: 0,
        }
    }
}

/// The device-wide settings a command is run with.
pub struct CommandCtx<'a> {
    pub ports: &'a mut BTreeMap<u8, Port>,
    pub in_flight: &'a mut InFlightSet,
    pub queue: usize,
    pub cdb_size: usize,
    pub sense_size: usize,
}

/// Runs the command in `chain`.
pub fn command(chain: Chain<'_>, mem: &GuestMemoryMmap, ctx: &mut CommandCtx<'_>) -> Handled {
    let sense_size = ctx.sense_size;
    let cdb_size = ctx.cdb_size;
    let head = chain.head_index();
    let descs = |w: bool| descriptors(&chain, w);
    let (Ok(mut reader), Ok(mut writer)) = (chain.clone().reader(mem), chain.clone().writer(mem))
    else {
        return Handled::Done(0);
    };
    let sense_size = sense_size.min(MAX_SENSE);
    let resp_len = RESP_HEADER + sense_size;
    if writer.available_bytes() < resp_len {
        // No room even for the response: nothing sensible can be said.
        return Handled::Done(0);
    }
    let Ok(mut data_in) = writer.split_at(resp_len) else {
        return Handled::Done(0);
    };
    let header_len = REQ_HEADER + cdb_size.min(MAX_CDB);
    let mut header = vec![0u8; header_len];
    let response = if reader.read_exact(&mut header).is_err() {
        Response::transport(S_FAILURE)
    } else {
        let lun = &header[0..8];
        let tag = u64::from_le_bytes([
            header[8], header[9], header[10], header[11], header[12], header[13], header[14],
            header[15],
        ]);
        let cdb = &header[REQ_HEADER..];
        match address(lun).and_then(|(t, l)| ctx.ports.get_mut(&t).map(|p| (t, p, l))) {
            None => Response::transport(S_BAD_TARGET),
            Some((target, port, unit)) => {
                let in_capacity = data_in.available_bytes();
                match port
                    .target
                    .execute(unit, cdb, &mut ChainDataOut(&mut reader))
                {
                    ScsiResult::Complete(c) => finish(c, &mut data_in, in_capacity),
                    ScsiResult::Io(io) if port.engine.is_some() && queued_kind(&io) => {
                        let data = match io.kind {
                            MediumIoKind::Read => sg_range(descs(true), resp_len, io.len as usize),
                            MediumIoKind::Write => {
                                sg_range(descs(false), header_len, io.len as usize)
                            }
                            _ => Vec::new(),
                        };
                        if sg_len(&data) as u64 != io.len && !matches!(io.kind, MediumIoKind::Flush)
                        {
                            Response::transport(S_OVERRUN)
                        } else {
                            let entry = InFlight {
                                queue: ctx.queue,
                                head,
                                port: target,
                                lun: unit,
                                tag,
                                cancelled: None,
                                io,
                                resp: sg_range(descs(true), 0, resp_len),
                                in_capacity,
                                flushing: false,
                            };
                            match submit(port, ctx.in_flight, entry, data) {
                                Ok(()) => return Handled::Queued,
                                Err(r) => r,
                            }
                        }
                    }
                    ScsiResult::Io(io) => {
                        let (outcome, short) = match &port.medium {
                            Some(disk) => perform(disk, &io, &mut reader, &mut data_in),
                            None => (Err(IoFailure::Other), false),
                        };
                        if short {
                            Response::transport(S_OVERRUN)
                        } else {
                            let c = port.target.io_done(unit, &io, outcome);
                            finish(c, &mut data_in, in_capacity)
                        }
                    }
                }
            }
        }
    };
    let resp = response.encode(resp_len);
    if writer.write_all(&resp).is_err() {
        return Handled::Done(0);
    }
    Handled::Done((writer.bytes_written() + data_in.bytes_written()) as u32)
}

/// The transfers the engine performs; discards and zeroing (rare, several ranges) go
/// through the image layer directly.
fn queued_kind(io: &MediumIo) -> bool {
    matches!(
        io.kind,
        MediumIoKind::Read | MediumIoKind::Write | MediumIoKind::Flush
    )
}

/// Hands a transfer to the port's engine. A request the engine refuses (its checks found a
/// guest buffer outside memory) is answered at once.
fn submit(
    port: &mut Port,
    set: &mut InFlightSet,
    entry: InFlight,
    data: Sg,
) -> Result<(), Response> {
    let Some(engine) = port.engine.as_mut() else {
        return Err(Response::transport(S_FAILURE));
    };
    let id = set.next;
    set.next = set.next.wrapping_add(1);
    let req = match entry.io.kind {
        MediumIoKind::Read => Request::read(entry.io.offset, data, id),
        MediumIoKind::Write => Request::write(entry.io.offset, data, id),
        _ => Request::flush(id),
    };
    match engine.submit(req) {
        Ok(()) => {
            set.map.insert(id, entry);
            Ok(())
        }
        Err(IoError::BadGuestMemory { .. }) => Err(Response::transport(S_FAILURE)),
        Err(e) => {
            tracing::debug!("virtio-scsi: the I/O engine refused a request: {e}");
            let c = port
                .target
                .io_done(entry.lun, &entry.io, Err(IoFailure::Other));
            Err(Response {
                response: S_OK,
                status: c.status.code(),
                sense: c
                    .sense
                    .map(|s| s.fixed_format().to_vec())
                    .unwrap_or_default(),
                resid: entry.in_capacity as u32,
            })
        }
    }
}

/// Collects port `port`'s finished transfers; returns (queue, head, used length) for each
/// request now answered.
pub fn reap(
    mem: &GuestMemoryMmap,
    port_id: u8,
    port: &mut Port,
    set: &mut InFlightSet,
) -> Vec<(usize, u16, u32)> {
    let Some(engine) = port.engine.as_mut() else {
        return Vec::new();
    };
    let done: Vec<_> = engine.completions().collect();
    let mut answered = Vec::new();
    for c in done {
        let Some(mut entry) = set.map.remove(&c.user_data) else {
            continue;
        };
        if entry.port != port_id {
            continue;
        }
        let resp_len = sg_len(&entry.resp);
        if let Some(response) = entry.cancelled {
            // Task management cancelled it: no status, no data, whatever the host did.
            let resp = Response::transport(response).encode(resp_len);
            let used = if write_sg(mem, &entry.resp, &resp) {
                resp_len as u32
            } else {
                0
            };
            answered.push((entry.queue, entry.head, used));
            continue;
        }
        let result = c
            .result
            .as_ref()
            .map(|_| ())
            .map_err(IoFailure::from_engine);
        // A write with FUA is complete once the flush after it is.
        if result.is_ok() && entry.io.fua && !entry.flushing {
            entry.flushing = true;
            let id = c.user_data;
            if let Some(engine) = port.engine.as_mut() {
                if engine.submit(Request::flush(id)).is_ok() {
                    set.map.insert(id, entry);
                    continue;
                }
            }
        }
        let moved = match (&entry.io.kind, &result) {
            (MediumIoKind::Read, Ok(())) => entry.io.len as usize,
            _ => 0,
        };
        let comp = port.target.io_done(entry.lun, &entry.io, result);
        let resp = Response {
            response: S_OK,
            status: comp.status.code(),
            sense: comp
                .sense
                .map(|s| s.fixed_format().to_vec())
                .unwrap_or_default(),
            resid: entry.in_capacity.saturating_sub(moved) as u32,
        }
        .encode(resp_len);
        let used = if write_sg(mem, &entry.resp, &resp) {
            (resp_len + moved) as u32
        } else {
            0
        };
        answered.push((entry.queue, entry.head, used));
    }
    answered
}

/// The target and LUN of a virtio-scsi LUN field: 1, target, then a flat-space LUN.
fn address(lun: &[u8]) -> Option<(u8, u16)> {
    match lun {
        [1, target, hi, lo, ..] => Some((*target, (u16::from(*hi & 0x3f) << 8) | u16::from(*lo))),
        _ => None,
    }
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
                    return (Err(IoFailure::from_storage(&e)), false);
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
                    return (Err(IoFailure::from_storage(&e)), false);
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
                    return (Err(IoFailure::from_storage(&e)), false);
                }
                done += n;
            }
            Ok(())
        }
        MediumIoKind::Flush => disk.flush().map_err(|e| IoFailure::from_storage(&e)),
        MediumIoKind::Discard(ranges) => ranges
            .iter()
            .try_for_each(|&(off, n)| disk.discard(off, n))
            .map_err(|e| IoFailure::from_storage(&e)),
    };
    (r, false)
}

/// A control-queue request: task management and asynchronous-notification setup. A task
/// management function that cancelled commands still on the host is answered later, by
/// `InFlightSet::finish_tmfs`.
pub fn control(
    chain: Chain<'_>,
    mem: &GuestMemoryMmap,
    ports: &mut BTreeMap<u8, Port>,
    set: &mut InFlightSet,
) -> Handled {
    let head = chain.head_index();
    let (Ok(mut reader), Ok(mut writer)) = (chain.clone().reader(mem), chain.clone().writer(mem))
    else {
        return Handled::Done(0);
    };
    let mut kind = [0u8; 4];
    if reader.read_exact(&mut kind).is_err() {
        return Handled::Done(0);
    }
    let reply: Vec<u8> = match u32::from_le_bytes(kind) {
        T_TMF => {
            // subtype, lun[8], id (the command's tag).
            let mut body = [0u8; 20];
            if reader.read_exact(&mut body).is_err() {
                return Handled::Done(0);
            }
            let subtype = u32::from_le_bytes([body[0], body[1], body[2], body[3]]);
            let tag = u64::from_le_bytes([
                body[12], body[13], body[14], body[15], body[16], body[17], body[18], body[19],
            ]);
            let (response, waits_for) = task_management(subtype, &body[4..12], tag, ports, set);
            if !waits_for.is_empty() {
                let resp = sg_range(descriptors(&chain, true), 0, 1);
                if sg_len(&resp) == 1 {
                    set.tmfs.push(PendingTmf {
                        head,
                        resp,
                        waits_for,
                        response,
                    });
                    return Handled::Queued;
                }
            }
            vec![response]
        }
        // No asynchronous events are offered (event_actual 0).
        T_AN_QUERY | T_AN_SUBSCRIBE => {
            let mut r = 0u32.to_le_bytes().to_vec();
            r.push(S_OK);
            r
        }
        _ => return Handled::Done(0),
    };
    if writer.available_bytes() < reply.len() || writer.write_all(&reply).is_err() {
        return Handled::Done(0);
    }
    Handled::Done(reply.len() as u32)
}

/// Runs a task-management function (SAM-5 7, as virtio-scsi carries it): returns the
/// response and the in-flight commands it must wait for. Cancelled commands still waiting
/// for the host are taken back from the engine; those already on the host cannot be, and
/// are answered ABORTED or RESET when their transfer ends.
fn task_management(
    subtype: u32,
    lun: &[u8],
    tag: u64,
    ports: &mut BTreeMap<u8, Port>,
    set: &mut InFlightSet,
) -> (u8, Vec<u64>) {
    let Some((target, unit)) = address(lun) else {
        return (S_BAD_TARGET, Vec::new());
    };
    let Some(port) = ports.get_mut(&target) else {
        return (S_BAD_TARGET, Vec::new());
    };
    if subtype != TMF_I_T_NEXUS_RESET && port.target.unit(unit).is_none() {
        return (S_INCORRECT_LUN, Vec::new());
    }
    // Which in-flight commands the function names, and how they are answered.
    let (one_task, whole_target, cancel) = match subtype {
        TMF_ABORT_TASK => (true, false, Some(S_ABORTED)),
        TMF_ABORT_TASK_SET | TMF_CLEAR_TASK_SET => (false, false, Some(S_ABORTED)),
        TMF_LOGICAL_UNIT_RESET => (false, false, Some(S_RESET)),
        TMF_I_T_NEXUS_RESET => (false, true, Some(S_RESET)),
        TMF_QUERY_TASK => (true, false, None),
        TMF_QUERY_TASK_SET => (false, false, None),
        // CLEAR ACA (no ACA is ever established) and anything unknown.
        _ => {
            tracing::warn!("virtio-scsi: task management function {subtype} rejected");
            return (S_FUNCTION_REJECTED, Vec::new());
        }
    };
    // Commands cancelled by an earlier function are named (and waited for) again.
    let named: Vec<u64> = set
        .map
        .iter()
        .filter(|(_, e)| {
            e.port == target && (whole_target || e.lun == unit) && (!one_task || e.tag == tag)
        })
        .map(|(&id, _)| id)
        .collect();
    let Some(response) = cancel else {
        // QUERY TASK (SET): whether such a command is still in the task set.
        let live = named
            .iter()
            .any(|id| set.map.get(id).is_some_and(|e| e.cancelled.is_none()));
        return (
            if live {
                S_FUNCTION_SUCCEEDED
            } else {
                S_FUNCTION_COMPLETE
            },
            Vec::new(),
        );
    };
    // A guest sends these when a command ran past its timeout: worth a warning, since it
    // means the host's I/O stalled (or a request was lost).
    tracing::warn!(
        "virtio-scsi: task management function {subtype} (0 abort, 5 LUN reset) for target \
         {target} LUN {unit}, tag {tag:#x}: {} command(s) in flight cancelled",
        named.len()
    );
    for id in &named {
        if let Some(e) = set.map.get_mut(id) {
            e.cancelled.get_or_insert(response);
        }
    }
    // Those still waiting for the host (held by a bandwidth group) never start: an aborted
    // write must not land after the driver was told it is gone.
    if let Some(engine) = port.engine.as_mut() {
        engine.cancel_waiting(&named);
    }
    match subtype {
        TMF_LOGICAL_UNIT_RESET => {
            if let Some(u) = port.target.unit_mut(unit) {
                u.reset();
            }
        }
        TMF_I_T_NEXUS_RESET => port.target.reset(),
        _ => {}
    }
    (S_FUNCTION_COMPLETE, named)
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
