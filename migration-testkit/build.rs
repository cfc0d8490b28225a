//! Assembles the test guests in `guests/` into flat binaries in `OUT_DIR`.
//!
//! Each guest `guests/<name>.S` (GNU as, AT&T syntax, `.include "common.S"`)
//! becomes `$OUT_DIR/<name>.bin` with `as --64` then `objcopy -O binary -j .text`.
//! The guests are position-independent and use fixed absolute addresses only,
//! so the object must carry no relocations: that is checked here, because
//! `objcopy -O binary` would silently leave unrelocated zeros in the image.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The guests to build; `common.S` is included by each of them.
const GUESTS: &[&str] = &[
    "counter_avx",
    "timer",
    "memory_pattern",
    "cpuid_report",
    "smp",
];

/// Largest image the guest ABI allows: it must fit in [0x10000, 0x80000).
const MAX_IMAGE: u64 = 0x70000;

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let guests = manifest.join("guests");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let assembler = env::var("AS").unwrap_or_else(|_| "as".to_string());
    let objcopy = env::var("OBJCOPY").unwrap_or_else(|_| "objcopy".to_string());
    println!("cargo:rerun-if-env-changed=AS");
    println!("cargo:rerun-if-env-changed=OBJCOPY");
    println!(
        "cargo:rerun-if-changed={}",
        guests.join("common.S").display()
    );

    for name in GUESTS {
        let src = guests.join(format!("{name}.S"));
        let obj = out.join(format!("{name}.o"));
        let bin = out.join(format!("{name}.bin"));
        println!("cargo:rerun-if-changed={}", src.display());

        run(
            Command::new(&assembler)
                .arg("--64")
                .arg("-I")
                .arg(&guests)
                .arg("-o")
                .arg(&obj)
                .arg(&src),
            &assembler,
        );
        check_no_relocations(&obj);
        run(
            Command::new(&objcopy)
                .args(["-O", "binary", "-j", ".text"])
                .arg(&obj)
                .arg(&bin),
            &objcopy,
        );
        let len = fs::metadata(&bin).map(|m| m.len()).unwrap_or(0);
        if len == 0 || len > MAX_IMAGE {
            panic!("guest {name}: image is {len} bytes, must be 1..={MAX_IMAGE}");
        }
    }
}

fn run(cmd: &mut Command, tool: &str) {
    let status = match cmd.status() {
        Ok(s) => s,
        Err(e) => panic!(
            "migration-testkit: cannot run `{tool}` ({e}). The test guests are assembled with \
             GNU binutils (`as`, `objcopy`): install binutils (e.g. `apt-get install binutils`) \
             or point the AS / OBJCOPY environment variables at them."
        ),
    };
    if !status.success() {
        panic!("migration-testkit: `{cmd:?}` failed with {status}");
    }
}

/// Fails the build if the ELF64 object has any SHT_REL / SHT_RELA section.
fn check_no_relocations(obj: &Path) {
    let data = fs::read(obj).unwrap_or_else(|e| panic!("read {}: {e}", obj.display()));
    let u16_at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(data[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(data[o..o + 8].try_into().unwrap()) as usize;
    assert!(
        data.len() >= 64 && &data[..4] == b"\x7fELF" && data[4] == 2,
        "{}: not an ELF64 object",
        obj.display()
    );
    let shoff = u64_at(0x28);
    let shentsize = u16_at(0x3a);
    let shnum = u16_at(0x3c);
    for i in 0..shnum {
        let sh_type = u32_at(shoff + i * shentsize + 4);
        if sh_type == 4 || sh_type == 9 {
            panic!(
                "{}: the guest needs relocations; use RIP-relative addressing for labels \
                 and absolute constants for fixed addresses",
                obj.display()
            );
        }
    }
}
