//! A tiny x86 assembler for 32-bit protected-mode test guests: just the instructions the
//! test programs use (moves, ALU with immediates, register `add`, `shl`, port I/O, jumps with
//! labels, `hlt`, `sti`, `iretd`), emitted as machine code bytes at a fixed load address.

use std::collections::HashMap;

/// A 32-bit general-purpose register (numbering as in ModRM).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Reg {
    /// EAX
    Eax = 0,
    /// ECX
    Ecx = 1,
    /// EDX
    Edx = 2,
    /// EBX
    Ebx = 3,
    /// EBP (not ESP: ESP as a base needs a SIB byte, which this assembler does not emit)
    Ebp = 5,
    /// ESI
    Esi = 6,
    /// EDI
    Edi = 7,
}

/// Condition codes for [`Asm::jcc`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Cond {
    /// below (unsigned <)
    B = 0x2,
    /// above or equal (unsigned >=)
    Ae = 0x3,
    /// equal
    E = 0x4,
    /// not equal
    Ne = 0x5,
}

/// Errors resolving a program.
#[derive(Debug, thiserror::Error, displaydoc::Display, PartialEq, Eq)]
#[ignore_extra_doc_attributes]
pub enum AsmError {
    /// undefined label {0:?}
    ///
    /// A jump names a label that was never defined.
    UndefinedLabel(String),
    /// label {0:?} defined twice
    ///
    /// A label was defined twice.
    DuplicateLabel(String),
}

/// ALU operations encoded as `81 /ext id`.
#[derive(Debug, Clone, Copy)]
enum Alu {
    Add = 0,
    Or = 1,
    And = 4,
    Cmp = 7,
}

/// Machine code being assembled for load address `origin`.
#[derive(Debug, Clone)]
pub struct Asm {
    origin: u32,
    code: Vec<u8>,
    labels: HashMap<String, u32>,
    fixups: Vec<(usize, String)>,
    duplicate: Option<String>,
}

fn modrm(md: u8, reg: u8, rm: u8) -> u8 {
    (md << 6) | ((reg & 7) << 3) | (rm & 7)
}

impl Asm {
    /// An empty program loaded at `origin`.
    pub fn new(origin: u32) -> Asm {
        Asm {
            origin,
            code: Vec::new(),
            labels: HashMap::new(),
            fixups: Vec::new(),
            duplicate: None,
        }
    }

    /// Address of the next instruction.
    pub fn here(&self) -> u32 {
        self.origin + self.code.len() as u32
    }

    /// Defines `name` at the current address.
    pub fn label(&mut self, name: &str) -> &mut Self {
        if self.labels.insert(name.to_owned(), self.here()).is_some() {
            self.duplicate = Some(name.to_owned());
        }
        self
    }

    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.code.extend_from_slice(b);
        self
    }

    fn imm(&mut self, v: u32) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }

    /// `mov r, imm32`
    pub fn mov_imm(&mut self, r: Reg, v: u32) -> &mut Self {
        self.bytes(&[0xb8 + r as u8]).imm(v)
    }

    /// `mov dst, src`
    pub fn mov(&mut self, dst: Reg, src: Reg) -> &mut Self {
        self.bytes(&[0x89, modrm(3, src as u8, dst as u8)])
    }

    /// `mov r, [addr]`
    pub fn load(&mut self, r: Reg, addr: u32) -> &mut Self {
        self.bytes(&[0x8b, modrm(0, r as u8, 5)]).imm(addr)
    }

    /// `mov [addr], r`
    pub fn store(&mut self, addr: u32, r: Reg) -> &mut Self {
        self.bytes(&[0x89, modrm(0, r as u8, 5)]).imm(addr)
    }

    /// `mov dword [addr], imm32`
    pub fn store_imm(&mut self, addr: u32, v: u32) -> &mut Self {
        self.bytes(&[0xc7, modrm(0, 0, 5)]).imm(addr).imm(v)
    }

    /// `mov r, [base + disp]`
    pub fn load_ind(&mut self, r: Reg, base: Reg, disp: u32) -> &mut Self {
        self.bytes(&[0x8b, modrm(2, r as u8, base as u8)]).imm(disp)
    }

    /// `mov [base + disp], r`
    pub fn store_ind(&mut self, base: Reg, disp: u32, r: Reg) -> &mut Self {
        self.bytes(&[0x89, modrm(2, r as u8, base as u8)]).imm(disp)
    }

    /// `mov dword [base + disp], imm32`
    pub fn store_ind_imm(&mut self, base: Reg, disp: u32, v: u32) -> &mut Self {
        self.bytes(&[0xc7, modrm(2, 0, base as u8)])
            .imm(disp)
            .imm(v)
    }

    fn alu(&mut self, op: Alu, r: Reg, v: u32) -> &mut Self {
        self.bytes(&[0x81, modrm(3, op as u8, r as u8)]).imm(v)
    }

    /// `add r, imm32`
    pub fn add_imm(&mut self, r: Reg, v: u32) -> &mut Self {
        self.alu(Alu::Add, r, v)
    }

    /// `or r, imm32`
    pub fn or_imm(&mut self, r: Reg, v: u32) -> &mut Self {
        self.alu(Alu::Or, r, v)
    }

    /// `and r, imm32`
    pub fn and_imm(&mut self, r: Reg, v: u32) -> &mut Self {
        self.alu(Alu::And, r, v)
    }

    /// `cmp r, imm32`
    pub fn cmp_imm(&mut self, r: Reg, v: u32) -> &mut Self {
        self.alu(Alu::Cmp, r, v)
    }

    /// `add dst, src`
    pub fn add(&mut self, dst: Reg, src: Reg) -> &mut Self {
        self.bytes(&[0x01, modrm(3, src as u8, dst as u8)])
    }

    /// `shl r, n` (n < 32)
    pub fn shl_imm(&mut self, r: Reg, n: u8) -> &mut Self {
        self.bytes(&[0xc1, modrm(3, 4, r as u8), n & 31])
    }

    /// `cmp a, b`
    pub fn cmp(&mut self, a: Reg, b: Reg) -> &mut Self {
        self.bytes(&[0x39, modrm(3, b as u8, a as u8)])
    }

    /// `inc dword [addr]`
    pub fn inc_mem(&mut self, addr: u32) -> &mut Self {
        self.bytes(&[0xff, modrm(0, 0, 5)]).imm(addr)
    }

    /// `out dx, eax`
    pub fn out_dx_eax(&mut self) -> &mut Self {
        self.bytes(&[0xef])
    }

    /// `in eax, dx`
    pub fn in_eax_dx(&mut self) -> &mut Self {
        self.bytes(&[0xed])
    }

    /// `hlt`
    pub fn hlt(&mut self) -> &mut Self {
        self.bytes(&[0xf4])
    }

    /// `sti`
    pub fn sti(&mut self) -> &mut Self {
        self.bytes(&[0xfb])
    }

    /// `cli`
    pub fn cli(&mut self) -> &mut Self {
        self.bytes(&[0xfa])
    }

    /// `pause`
    pub fn pause(&mut self) -> &mut Self {
        self.bytes(&[0xf3, 0x90])
    }

    /// `iretd`
    pub fn iret(&mut self) -> &mut Self {
        self.bytes(&[0xcf])
    }

    /// `retf imm16`: far return, then release `n` more bytes of stack.
    pub fn retf_imm(&mut self, n: u16) -> &mut Self {
        self.bytes(&[0xca]).bytes(&n.to_le_bytes())
    }

    /// `jmp label` (rel32)
    pub fn jmp(&mut self, label: &str) -> &mut Self {
        self.bytes(&[0xe9]);
        self.fixup(label)
    }

    /// `jcc label` (rel32)
    pub fn jcc(&mut self, cond: Cond, label: &str) -> &mut Self {
        self.bytes(&[0x0f, 0x80 + cond as u8]);
        self.fixup(label)
    }

    fn fixup(&mut self, label: &str) -> &mut Self {
        self.fixups.push((self.code.len(), label.to_owned()));
        self.imm(0)
    }

    /// Resolves labels and returns the machine code.
    pub fn finish(mut self) -> Result<Vec<u8>, AsmError> {
        if let Some(d) = self.duplicate {
            return Err(AsmError::DuplicateLabel(d));
        }
        for (pos, label) in &self.fixups {
            let target = *self
                .labels
                .get(label)
                .ok_or_else(|| AsmError::UndefinedLabel(label.clone()))?;
            let next = self.origin + *pos as u32 + 4;
            let rel = target.wrapping_sub(next);
            self.code[*pos..*pos + 4].copy_from_slice(&rel.to_le_bytes());
        }
        Ok(self.code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_match_reference_bytes() {
        // Reference bytes from the Intel SDM encodings (checked with objdump -M i386).
        let mut a = Asm::new(0x1000);
        a.mov_imm(Reg::Edx, 0xcf8) // ba f8 0c 00 00
            .out_dx_eax() // ef
            .load(Reg::Eax, 0x2000) // 8b 05 00 20 00 00
            .store_ind(Reg::Ebx, 12, Reg::Eax) // 89 83 0c 00 00 00
            .cmp_imm(Reg::Eax, 5) // 81 f8 05 00 00 00
            .inc_mem(0x2100) // ff 05 00 21 00 00
            .store_imm(0xfee0_00b0, 0); // c7 05 b0 00 e0 fe 00 00 00 00
        let code = a.finish().unwrap();
        assert_eq!(
            code,
            vec![
                0xba, 0xf8, 0x0c, 0, 0, 0xef, 0x8b, 0x05, 0x00, 0x20, 0, 0, 0x89, 0x83, 0x0c, 0, 0,
                0, 0x81, 0xf8, 5, 0, 0, 0, 0xff, 0x05, 0x00, 0x21, 0, 0, 0xc7, 0x05, 0xb0, 0x00,
                0xe0, 0xfe, 0, 0, 0, 0
            ]
        );
    }

    #[test]
    fn register_arithmetic_encodings() {
        let mut a = Asm::new(0);
        a.add(Reg::Eax, Reg::Esi) // 01 f0
            .add(Reg::Esi, Reg::Eax) // 01 c6
            .shl_imm(Reg::Eax, 12) // c1 e0 0c
            .shl_imm(Reg::Edi, 1); // c1 e7 01
        assert_eq!(
            a.finish().unwrap(),
            vec![0x01, 0xf0, 0x01, 0xc6, 0xc1, 0xe0, 0x0c, 0xc1, 0xe7, 0x01]
        );
    }

    #[test]
    fn labels_resolve_backwards_and_forwards() {
        let mut a = Asm::new(0x1000);
        a.label("top")
            .jcc(Cond::E, "end")
            .jmp("top")
            .label("end")
            .hlt();
        let code = a.finish().unwrap();
        // je +5 (skip the 5-byte jmp); jmp -11 (back to 0x1000 from 0x100b).
        assert_eq!(
            code,
            vec![0x0f, 0x84, 5, 0, 0, 0, 0xe9, 0xf5, 0xff, 0xff, 0xff, 0xf4]
        );
    }

    #[test]
    fn undefined_label_is_an_error() {
        let mut a = Asm::new(0);
        a.jmp("nowhere");
        assert_eq!(a.finish(), Err(AsmError::UndefinedLabel("nowhere".into())));
    }
}
