//! The 16550 UART on ttyS0 (ports 0x3f8-0x3ff, IRQ 4): glue around
//! `vm_superio::Serial`, output to the VMM's stdout (or a buffer).

use parking_lot::Mutex;
use std::io::Write;
use std::sync::Arc;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

pub const COM1_BASE: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;

/// `vm_superio`'s interrupt trigger over an eventfd (registered as an
/// irqfd when there is an in-kernel irqchip).
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Where guest console output goes.
#[derive(Clone)]
pub enum Sink {
    Stdout,
    Buffer(Arc<Mutex<Vec<u8>>>),
}

impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match self {
            Sink::Stdout => std::io::stdout().lock().write(b),
            Sink::Buffer(v) => {
                v.lock().extend_from_slice(b);
                Ok(b.len())
            }
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Sink::Stdout => std::io::stdout().flush(),
            Sink::Buffer(_) => Ok(()),
        }
    }
}

pub struct SerialPort {
    uart: Mutex<Serial<IrqTrigger, vm_superio::serial::NoEvents, Sink>>,
}

impl SerialPort {
    pub fn new(irq: EventFd, sink: Sink) -> Self {
        SerialPort {
            uart: Mutex::new(Serial::new(IrqTrigger(irq), sink)),
        }
    }

    pub fn handles(port: u16) -> bool {
        (COM1_BASE..COM1_BASE + 8).contains(&port)
    }

    pub fn write(&self, port: u16, data: &[u8]) {
        if let Some(&b) = data.first() {
            if let Err(e) = self.uart.lock().write((port - COM1_BASE) as u8, b) {
                log::debug!("serial write: {e:?}");
            }
        }
    }

    pub fn read(&self, port: u16, data: &mut [u8]) {
        let v = self.uart.lock().read((port - COM1_BASE) as u8);
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }

    /// Feed host input to the guest.
    pub fn enqueue(&self, bytes: &[u8]) {
        if let Err(e) = self.uart.lock().enqueue_raw_bytes(bytes) {
            log::debug!("serial input dropped: {e:?}");
        }
    }
}
