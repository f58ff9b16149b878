//! A bare image for `thumbv7em-none-eabihf` that keeps every code path of
//! `ferrite-agent-core` a device uses (payloads, commands, records, spool, back-off, tokens,
//! OTA verification), so that `scripts/mcu-size.sh` can report the flash the core costs. It
//! is never flashed: the entry point only calls the paths with inputs the linker cannot
//! see through. On the host it builds as an ordinary program that runs the same calls.
#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", no_main)]

extern crate alloc;

use alloc::vec::Vec;

use ferrite_agent_core::{backoff, command, ota, payload, record, spool, token, topics};

/// Every path, on bytes the caller supplies (opaque to the optimiser).
fn exercise(input: &[u8]) -> usize {
    let mut n = 0;
    let topic = topics::telemetry("probe", None);
    n += topic.len();
    if let Ok(cmd) = payload::decode_command(input) {
        let mut c = command::Commands::new(command::Level::Semi);
        if let command::Decision::Answer(r) = c.decide(&cmd) {
            n += r.encode().len();
        }
    }
    if let Ok(d) = payload::decode_desired(input) {
        n += d.state.len();
    }
    let reading = payload::Reading { ts_ms: input.len() as i64, seq: 1, fields: Vec::new() };
    let batch = payload::encode_batch([&reading]);
    let rec = record::encode(7, &batch);
    n += record::scan(&rec).records.len();
    let mut s = spool::Spool::new(4096, 1024);
    if let Some(actions) = s.append(rec.len() as u64) {
        n += actions.len();
    }
    n += s.ack(rec.len() as u64).len();
    let mut b = backoff::Backoff::new(100, 60_000);
    n += b.next_delay(input.len() as u32) as usize;
    n += usize::from(token::TokenTimes::new(0, 900).due(input.len() as i64));
    let mut v = ota::Verifier::new();
    v.update(input);
    let key = [0u8; 32];
    let sig = [0u8; 64];
    n += usize::from(v.finish(&[0u8; 32], &sig, &key).is_ok());
    n
}

#[cfg(target_os = "none")]
mod bare {
    use core::alloc::{GlobalAlloc, Layout};
    use core::sync::atomic::{AtomicUsize, Ordering};

    /// A bump allocator over a static arena: enough to link `alloc`.
    struct Bump;

    const ARENA: usize = 16 * 1024;
    static mut HEAP: [u8; ARENA] = [0; ARENA];
    static NEXT: AtomicUsize = AtomicUsize::new(0);

    unsafe impl GlobalAlloc for Bump {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let start = (NEXT.load(Ordering::Relaxed) + layout.align() - 1) & !(layout.align() - 1);
            let end = start + layout.size();
            if end > ARENA {
                return core::ptr::null_mut();
            }
            NEXT.store(end, Ordering::Relaxed);
            unsafe { (&raw mut HEAP).cast::<u8>().add(start) }
        }
        unsafe fn dealloc(&self, _: *mut u8, _: Layout) {}
    }

    #[global_allocator]
    static ALLOC: Bump = Bump;

    #[panic_handler]
    fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
        loop {}
    }

    /// The entry point: runs the paths over bytes at an address the linker cannot know.
    #[unsafe(no_mangle)]
    pub extern "C" fn _start() -> ! {
        let input = unsafe { core::slice::from_raw_parts(0x2000_0000 as *const u8, 64) };
        let n = super::exercise(input);
        unsafe { core::ptr::write_volatile(0x2000_0100 as *mut usize, n) };
        loop {}
    }
}

#[cfg(not(target_os = "none"))]
fn main() {
    let n = exercise(br#"{"id": "c1", "name": "wipe"}"#);
    assert!(n > 0);
    println!("ok {n}");
}
