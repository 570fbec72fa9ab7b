//! SMART (ACS-3 SMART feature set): the subcommands a guest's health checks use. A virtual disk
//! never wears out, so every attribute is at its best and no threshold is exceeded.

use super::log::checksum;
use super::taskfile::Taskfile;
use super::{complete, good, AtaCompletion, AtaError, CmdResult};

/// Features values of the SMART subcommands (ACS-3 SMART).
pub(crate) mod sub {
    pub const READ_DATA: u8 = 0xd0;
    pub const ATTRIBUTE_AUTOSAVE: u8 = 0xd2;
    pub const READ_LOG: u8 = 0xd5;
    pub const WRITE_LOG: u8 = 0xd6;
    pub const ENABLE_OPERATIONS: u8 = 0xd8;
    pub const DISABLE_OPERATIONS: u8 = 0xd9;
    pub const RETURN_STATUS: u8 = 0xda;
}

/// Every SMART command carries this key in LBA mid/high (ACS-3 SMART): 4Fh, C2h.
const KEY_LBA: u64 = 0xc2_4f00;
const KEY_MASK: u64 = 0xff_ff00;
/// Attribute table revision in bytes 0-1 of the data (SFF-8035i).
const DATA_REVISION: u16 = 0x0010;

/// SMART attributes reported: (id, flags, raw value). Flags: bit 0 pre-failure, bit 1
/// updated online (SFF-8035i); current and worst values are 100, thresholds never reached.
const ATTRIBUTES: [(u8, u16, u64); 5] = [
    (0x01, 0x000b, 0),  // raw read error rate
    (0x05, 0x0033, 0),  // reallocated sector count
    (0x09, 0x0032, 0),  // power-on hours
    (0x0c, 0x0032, 0),  // power cycle count
    (0xc2, 0x0022, 30), // temperature, °C
];

/// SMART with its subcommand in features; `enabled` is SMART ENABLE/DISABLE OPERATIONS'
/// state, which this may change.
pub(crate) fn execute(tf: &Taskfile, enabled: &mut bool) -> CmdResult {
    if tf.lba & KEY_MASK != KEY_LBA {
        return Err(AtaError::Aborted);
    }
    let subcommand = tf.feature();
    // ACS-3 SMART: with SMART disabled everything but ENABLE OPERATIONS aborts.
    if !*enabled && subcommand != sub::ENABLE_OPERATIONS {
        return Err(AtaError::Aborted);
    }
    match subcommand {
        sub::ENABLE_OPERATIONS => {
            *enabled = true;
            good()
        }
        sub::DISABLE_OPERATIONS => {
            *enabled = false;
            good()
        }
        // Autosave on or off (count F1h/00h): there is nothing to save.
        sub::ATTRIBUTE_AUTOSAVE => good(),
        sub::RETURN_STATUS => complete(AtaCompletion {
            // 4Fh/C2h: no threshold exceeded (F4h/2Ch would say one is).
            lba: KEY_LBA,
            ..AtaCompletion::good()
        }),
        sub::READ_DATA => complete(AtaCompletion::with_data(data())),
        // EXECUTE OFFLINE IMMEDIATE, READ/WRITE LOG and the rest: not supported (IDENTIFY
        // word 84 reports neither SMART self-test nor error logging).
        _ => Err(AtaError::Aborted),
    }
}

/// The device SMART data structure (ACS-3 / ATA8-ACS SMART READ DATA).
fn data() -> Vec<u8> {
    let mut b = vec![0u8; 512];
    b[0..2].copy_from_slice(&DATA_REVISION.to_le_bytes());
    for (i, (id, flags, raw)) in ATTRIBUTES.iter().enumerate() {
        let e = &mut b[2 + i * 12..2 + (i + 1) * 12];
        e[0] = *id;
        e[1..3].copy_from_slice(&flags.to_le_bytes());
        e[3] = 100;
        e[4] = 100;
        e[5..11].copy_from_slice(&raw.to_le_bytes()[..6]);
    }
    // Byte 362: off-line data collection never started; 363: no self-test has run
    // (completed without error); 367: no off-line or self-test capabilities; 368-369:
    // saves SMART data before power saving (bit 0) and supports autosave (bit 1).
    b[368] = 0x03;
    checksum(&mut b);
    b
}
