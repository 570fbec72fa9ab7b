//! virtio-scsi (device type 8): a SCSI host whose targets are the controller's ports, each
//! with one logical unit (LUN 0) from the shared SCSI target in `crate::scsi`. Queue 0 carries
//! task management, queue 1 events (hot-plug, media change), the rest commands.

mod request;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::sync::Arc;

use ferry_storage::io::IoEngine;
use ferry_storage::Disk;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::VirtioDevice;
use crate::scsi::{LogicalUnit, ScsiTarget};

pub const DEVICE_TYPE: u16 = 8;
const F_HOTPLUG: u64 = 1 << 1;
const F_CHANGE: u64 = 1 << 2;
const CONTROL_QUEUE: usize = 0;
const EVENT_QUEUE: usize = 1;
const QUEUE_SIZE: u16 = 256;
/// Ports are SCSI targets 0..=MAX_TARGET; each has LUN 0.
pub const MAX_TARGET: u16 = 255;
const DEFAULT_SENSE_SIZE: u32 = 96;
const DEFAULT_CDB_SIZE: u32 = 32;

/// What sits on a port: the SCSI unit, the medium its data goes to, and the I/O engine that
/// moves reads, writes and flushes (without one, they go through the image layer inline).
pub struct Port {
    pub target: ScsiTarget,
    pub medium: Option<Arc<Disk>>,
    pub engine: Option<IoEngine>,
}

/// An event for the driver's event queue (virtio_scsi_event).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    pub event: u32,
    pub target: u8,
    pub reason: u32,
}

/// VIRTIO_SCSI_T_TRANSPORT_RESET with reason RESCAN (a device appeared) or REMOVED.
pub const T_TRANSPORT_RESET: u32 = 1;
pub const EVT_RESET_RESCAN: u32 = 0;
pub const EVT_RESET_REMOVED: u32 = 2;
/// VIRTIO_SCSI_T_PARAM_CHANGE: a unit's parameters changed; the reason carries the unit
/// attention's ASC (bits 0..8) and ASCQ (bits 8..16).
pub const T_PARAM_CHANGE: u32 = 3;
const ASC_MEDIUM_CHANGED: u32 = 0x28;
const ASC_MEDIUM_NOT_PRESENT: u32 = 0x3a;
const T_EVENTS_MISSED: u32 = 0x8000_0000;

pub struct VirtioScsi {
    ports: BTreeMap<u8, Port>,
    in_flight: request::InFlightSet,
    /// The port behind each event source (its engine's completion eventfd).
    event_ports: Vec<u8>,
    request_queues: u16,
    sense_size: u32,
    cdb_size: u32,
    events: VecDeque<Event>,
    events_missed: bool,
    /// Features the driver accepted (events are only sent for those it asked for).
    features: u64,
}

impl VirtioScsi {
    pub fn new(request_queues: u16) -> Self {
        Self {
            ports: BTreeMap::new(),
            in_flight: request::InFlightSet::default(),
            event_ports: Vec::new(),
            request_queues: request_queues.clamp(1, 16),
            sense_size: DEFAULT_SENSE_SIZE,
            cdb_size: DEFAULT_CDB_SIZE,
            events: VecDeque::new(),
            events_missed: false,
            features: 0,
        }
    }

    /// Puts `unit` on `port` as LUN 0, backed by `medium` (None: an empty CD/DVD drive).
    pub fn attach(
        &mut self,
        port: u8,
        unit: LogicalUnit,
        medium: Option<Arc<Disk>>,
        engine: Option<IoEngine>,
    ) -> Result<(), String> {
        if self.ports.contains_key(&port) {
            return Err(format!("port {port} is already in use"));
        }
        let mut target = ScsiTarget::new();
        target.attach(0, unit).map_err(|e| e.to_string())?;
        if engine.is_some() {
            self.event_ports.push(port);
        }
        self.ports.insert(
            port,
            Port {
                target,
                medium,
                engine,
            },
        );
        Ok(())
    }

    /// Removes the unit on `port` and queues the hot-unplug event for the driver.
    pub fn detach(&mut self, port: u8) -> Option<Port> {
        let p = self.ports.remove(&port)?;
        self.in_flight.forget_port(port);
        self.events.push_back(Event {
            event: T_TRANSPORT_RESET,
            target: port,
            reason: EVT_RESET_REMOVED,
        });
        Some(p)
    }

    /// Puts `medium` into the CD/DVD drive on `port`, or ejects it (None). The guest sees a
    /// unit attention and, if it asked for VIRTIO_SCSI_F_CHANGE, an event; the transport must
    /// then run the event queue (`VirtioPci::queue_notified(1)`). The new medium is read inline
    /// through the image layer.
    pub fn change_medium(&mut self, port: u8, medium: Option<Arc<Disk>>) -> Result<(), String> {
        let p = self
            .ports
            .get_mut(&port)
            .ok_or_else(|| format!("port {port} has nothing attached"))?;
        let Some(LogicalUnit::Cd(cd)) = p.target.unit_mut(0) else {
            return Err(format!("port {port} is not a CD/DVD drive"));
        };
        let asc = match &medium {
            Some(m) => {
                cd.insert(m.size());
                ASC_MEDIUM_CHANGED
            }
            None => {
                cd.eject();
                ASC_MEDIUM_NOT_PRESENT
            }
        };
        p.medium = medium;
        p.engine = None;
        if self.features & F_CHANGE != 0 {
            self.events.push_back(Event {
                event: T_PARAM_CHANGE,
                target: port,
                reason: asc,
            });
        }
        Ok(())
    }

    fn engines(&mut self) -> impl Iterator<Item = &mut IoEngine> {
        self.ports.values_mut().filter_map(|p| p.engine.as_mut())
    }

    pub fn port_mut(&mut self, port: u8) -> Option<&mut Port> {
        self.ports.get_mut(&port)
    }

    /// Fills the driver's event buffers with queued events; true if any was used.
    fn deliver_events(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        while !self.events.is_empty() || self.events_missed {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let (event, target, reason) = match self.events.pop_front() {
                Some(e) => (
                    e.event
                        | if self.events_missed {
                            T_EVENTS_MISSED
                        } else {
                            0
                        },
                    e.target,
                    e.reason,
                ),
                None => (T_EVENTS_MISSED, 0, 0),
            };
            self.events_missed = false;
            let mut buf = [0u8; 16];
            buf[0..4].copy_from_slice(&event.to_le_bytes());
            buf[4] = 1;
            buf[5] = target;
            buf[12..16].copy_from_slice(&reason.to_le_bytes());
            let len = match chain.writer(mem) {
                Ok(mut w) if w.available_bytes() >= buf.len() => {
                    w.write_all(&buf).map(|_| buf.len() as u32).unwrap_or(0)
                }
                _ => 0,
            };
            let _ = queue.add_used(mem, head, len);
            used = true;
        }
        if self.events.len() > 64 {
            // Nobody listens: drop the backlog and say so when a buffer comes.
            self.events.clear();
            self.events_missed = true;
        }
        used
    }
}

impl VirtioScsi {
    /// Takes the commands on request queue `index`, submits them, and answers what is done;
    /// returns the queues to signal.
    fn process_requests(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Vec<usize> {
        let mut signal = Vec::new();
        let mut empty_passes = 0u8;
        while let Some(queue) = queues.get_mut(index) {
            if queue.disable_notification(mem).is_err() {
                break;
            }
            // The requests taken in this pass go to each disk's host in one submission.
            self.engines().for_each(IoEngine::plug);
            let mut popped = 0usize;
            let mut used = false;
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                popped += 1;
                let head = chain.head_index();
                let mut ctx = request::CommandCtx {
                    ports: &mut self.ports,
                    in_flight: &mut self.in_flight,
                    queue: index,
                    cdb_size: self.cdb_size as usize,
                    sense_size: self.sense_size as usize,
                };
                if let request::Handled::Done(len) = request::command(chain, mem, &mut ctx) {
                    if let Err(e) = queue.add_used(mem, head, len) {
                        tracing::debug!("virtio-scsi: used ring: {e}");
                    }
                    used = true;
                }
            }
            self.engines().for_each(IoEngine::unplug);
            if used && !signal.contains(&index) {
                signal.push(index);
            }
            // A read the host has cached, or a small write, is often done when the submit
            // call returns: answer it now, not after another wake of the event loop. And do so
            // with notifications still off: what the guest adds meanwhile is found below
            // without a kick (an exit) of its own.
            self.answer_busy_ports(queues, mem, &mut signal);
            // Answers go to the driver before more work is taken: held back, they would
            // stall a driver waiting for them (seen: 1 MiB reads at depth 8 lost 20%). The
            // transport runs the queue again if buffers wait (`VirtioPci::queue_notified`).
            let answered = !signal.is_empty();
            let Some(queue) = queues.get_mut(index) else {
                break;
            };
            // More buffers arrived while notifications were off: go round again. That holds
            // for a pass that found none too: a buffer added between its last pop and the
            // re-enabling would otherwise wait for ever, since `avail_event` now names it and
            // the driver, having read the old value, kicks for none after it. Only a second
            // empty pass that still sees more means a ring index the guest broke: then stop
            // instead of spinning.
            empty_passes = if popped == 0 { empty_passes + 1 } else { 0 };
            match queue.enable_notification(mem) {
                Ok(true) if empty_passes < 2 && !answered => continue,
                _ => break,
            }
        }
        signal
    }

    /// Answers what the engines of ports with requests out have finished. An idle port's
    /// engine costs no system call.
    fn answer_busy_ports(
        &mut self,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
        signal: &mut Vec<usize>,
    ) {
        for i in 0..self.event_ports.len() {
            let port_id = self.event_ports[i];
            let busy = self.ports.get(&port_id).and_then(|p| p.engine.as_ref());
            if busy.is_some_and(|e| e.outstanding() > 0) {
                self.answer_finished(port_id, queues, mem, signal);
            }
        }
    }

    /// Answers the commands whose transfers port `port_id`'s engine has finished, and the
    /// task management that waited for them; adds each queue that got one to `signal`.
    fn answer_finished(
        &mut self,
        port_id: u8,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
        signal: &mut Vec<usize>,
    ) {
        let Some(port) = self.ports.get_mut(&port_id) else {
            return;
        };
        let answered = request::reap(mem, port_id, port, &mut self.in_flight);
        // Task management waiting for these commands is answered after them.
        let tmfs = self.in_flight.finish_tmfs(mem);
        let tmfs = tmfs
            .into_iter()
            .map(|(head, len)| (CONTROL_QUEUE, head, len));
        for (q, head, len) in answered.into_iter().chain(tmfs) {
            if let Some(queue) = queues.get_mut(q) {
                if let Err(e) = queue.add_used(mem, head, len) {
                    tracing::debug!("virtio-scsi: used ring: {e}");
                }
                if !signal.contains(&q) {
                    signal.push(q);
                }
            }
        }
    }
}

impl VirtioDevice for VirtioScsi {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE
    }

    fn device_features(&self) -> u64 {
        F_HOTPLUG | F_CHANGE
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 2 + usize::from(self.request_queues)]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_scsi_config, all little endian.
        let mut cfg = Vec::with_capacity(36);
        for v in [
            u32::from(self.request_queues),
            u32::from(QUEUE_SIZE) - 2, // seg_max: the header and response take a descriptor each
            0xffff,                    // max_sectors
            u32::from(QUEUE_SIZE),     // cmd_per_lun
            16,                        // event_info_size
            self.sense_size,
            self.cdb_size,
        ] {
            cfg.extend_from_slice(&v.to_le_bytes());
        }
        cfg.extend_from_slice(&0u16.to_le_bytes()); // max_channel
        cfg.extend_from_slice(&MAX_TARGET.to_le_bytes());
        cfg.extend_from_slice(&0u32.to_le_bytes()); // max_lun: one unit per target
        data.fill(0);
        let start = offset as usize;
        if let Some(src) = cfg.get(start..) {
            let n = src.len().min(data.len());
            data[..n].copy_from_slice(&src[..n]);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(b);
        match offset {
            20 => self.sense_size = v.clamp(0, request::MAX_SENSE as u32),
            24 => self.cdb_size = v.clamp(6, request::MAX_CDB as u32),
            _ => {}
        }
    }

    fn activate(&mut self, features: u64) {
        self.features = features;
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }

    fn reset(&mut self) {
        self.features = 0;
        self.sense_size = DEFAULT_SENSE_SIZE;
        self.cdb_size = DEFAULT_CDB_SIZE;
        // Transfers still on the host complete into nothing: their buffers are the old
        // driver's, and a reset device answers no request from before.
        self.in_flight.clear();
        for p in self.ports.values_mut() {
            p.target.reset();
        }
    }

    fn event_sources(&self) -> Vec<Arc<EventFd>> {
        self.event_ports
            .iter()
            .filter_map(|p| self.ports.get(p)?.engine.as_ref())
            .filter_map(|e| match e.eventfd().try_clone() {
                Ok(fd) => Some(Arc::new(fd)),
                Err(err) => {
                    tracing::error!("virtio-scsi: cannot poll an I/O engine: {err}");
                    None
                }
            })
            .collect()
    }

    fn process_event(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Vec<usize> {
        let Some(&port_id) = self.event_ports.get(index) else {
            return Vec::new();
        };
        let mut signal = Vec::new();
        self.answer_finished(port_id, queues, mem, &mut signal);
        signal
    }

    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Vec<usize> {
        if index >= queues.len() {
            return Vec::new();
        }
        let queue = &mut queues[index];
        match index {
            EVENT_QUEUE => {
                if self.deliver_events(queue, mem) {
                    vec![EVENT_QUEUE]
                } else {
                    Vec::new()
                }
            }
            CONTROL_QUEUE => {
                let mut used = false;
                while let Some(chain) = queue.pop_descriptor_chain(mem) {
                    let head = chain.head_index();
                    if let request::Handled::Done(len) =
                        request::control(chain, mem, &mut self.ports, &mut self.in_flight)
                    {
                        let _ = queue.add_used(mem, head, len);
                        used = true;
                    }
                }
                if used {
                    vec![CONTROL_QUEUE]
                } else {
                    Vec::new()
                }
            }
            _ => self.process_requests(index, queues, mem),
        }
    }
}
