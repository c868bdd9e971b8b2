//! Devices, one folder each, and the port/MMIO dispatch the vCPU loop uses.

pub mod rnic;
pub mod serial;
pub mod testdev;

use crate::layout::{RNIC_MMIO_GPA, RNIC_MMIO_SIZE, TESTDEV_MMIO_GPA, TESTDEV_MMIO_SIZE};
use std::sync::Arc;
use testdev::{Outcome, TestDevice, VcpuReport};

/// i8042 command port; writing 0xfe there pulses the CPU reset line.
const I8042_CMD: u16 = 0x64;
const I8042_DATA: u16 = 0x60;
const I8042_RESET: u8 = 0xfe;

/// What the vCPU loop does after a device access.
#[derive(Debug, PartialEq, Eq)]
pub enum IoAction {
    Continue,
    /// The payload on this vCPU finished.
    Finished(VcpuReport),
    /// The guest asked for a reset (the VM stops).
    Reset,
}

/// Every device a vCPU can reach.
pub struct Devices {
    pub testdev: Arc<TestDevice>,
    pub serial: Option<Arc<serial::SerialPort>>,
    pub rnic: Option<Arc<rnic::RnicDevice>>,
}

impl Devices {
    pub fn mmio_write(&self, vcpu: usize, addr: u64, data: &[u8]) -> IoAction {
        if (TESTDEV_MMIO_GPA..TESTDEV_MMIO_GPA + TESTDEV_MMIO_SIZE).contains(&addr) {
            return match self.testdev.write(vcpu, addr - TESTDEV_MMIO_GPA, data) {
                Outcome::Continue => IoAction::Continue,
                Outcome::Finished(r) => IoAction::Finished(r),
            };
        }
        if let Some(r) = &self.rnic {
            if (RNIC_MMIO_GPA..RNIC_MMIO_GPA + RNIC_MMIO_SIZE).contains(&addr) {
                r.mmio_write(addr - RNIC_MMIO_GPA, data);
            }
        }
        IoAction::Continue
    }

    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if (TESTDEV_MMIO_GPA..TESTDEV_MMIO_GPA + TESTDEV_MMIO_SIZE).contains(&addr) {
            return self.testdev.read(addr - TESTDEV_MMIO_GPA, data);
        }
        if let Some(r) = &self.rnic {
            if (RNIC_MMIO_GPA..RNIC_MMIO_GPA + RNIC_MMIO_SIZE).contains(&addr) {
                return r.mmio_read(addr - RNIC_MMIO_GPA, data);
            }
        }
        // Nothing here: reads as zero (so a missing device's ID is 0).
        data.fill(0);
    }

    pub fn io_out(&self, _vcpu: usize, port: u16, data: &[u8]) -> IoAction {
        if serial::SerialPort::handles(port) {
            if let Some(s) = &self.serial {
                s.write(port, data);
            }
            return IoAction::Continue;
        }
        if port == I8042_CMD && data.first() == Some(&I8042_RESET) {
            return IoAction::Reset;
        }
        IoAction::Continue
    }

    pub fn io_in(&self, port: u16, data: &mut [u8]) {
        if serial::SerialPort::handles(port) {
            if let Some(s) = &self.serial {
                s.read(port, data);
                return;
            }
        }
        // i8042 status/data: nothing pending. Anything else: open bus.
        let fill = if port == I8042_CMD || port == I8042_DATA {
            0
        } else {
            0xff
        };
        data.fill(fill);
    }
}
