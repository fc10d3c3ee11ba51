//! Just enough of the kernel's BTF (`/sys/kernel/btf/vmlinux`) to decide which programs a
//! kernel can run and where the fields they read sit: which tracepoints and functions exist
//! with which parameters, which BPF helpers and map types the kernel knows, and a few
//! structures' member offsets and sizes. The bytes are the kernel's; a malformed file is an
//! error, never a panic.

use std::collections::HashMap;

const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum BtfError {
    #[error("not BTF (bad magic or header)")]
    Header,
    #[error("truncated at byte {0}")]
    Truncated(usize),
    #[error("unknown BTF kind {kind} (type {id})")]
    UnknownKind { kind: u32, id: usize },
}

/// One type: its kind, name, `vlen`, size-or-type word and where its trailing data starts.
#[derive(Clone, Copy, Debug)]
struct Entry {
    kind: u32,
    kind_flag: bool,
    name: u32,
    vlen: u32,
    size_or_type: u32,
    data: usize,
}

/// A parsed kernel BTF, queried by name.
pub(crate) struct KernelBtf {
    bytes: Vec<u8>,
    strings: usize,
    strings_len: usize,
    /// Type id i + 1 is `types[i]`.
    types: Vec<Entry>,
    /// (kind, name) to the first type id of that kind with that name.
    by_name: HashMap<(u32, String), u32>,
}

impl KernelBtf {
    /// Parses a little-endian BTF blob (the only byte order of the kernels we support).
    pub(crate) fn parse(bytes: Vec<u8>) -> Result<Self, BtfError> {
        let u32_at = |at: usize| -> Result<u32, BtfError> {
            bytes
                .get(at..at + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or(BtfError::Truncated(at))
        };
        if bytes.len() < 24 || u16::from_le_bytes([bytes[0], bytes[1]]) != MAGIC {
            return Err(BtfError::Header);
        }
        let hdr_len = u32_at(4)? as usize;
        let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
        let (str_off, str_len) = (u32_at(16)? as usize, u32_at(20)? as usize);
        let types_start = hdr_len.checked_add(type_off).ok_or(BtfError::Header)?;
        let types_end = types_start.checked_add(type_len).ok_or(BtfError::Header)?;
        let strings = hdr_len.checked_add(str_off).ok_or(BtfError::Header)?;
        if types_end > bytes.len() || strings.checked_add(str_len).is_none_or(|end| end > bytes.len()) {
            return Err(BtfError::Truncated(bytes.len()));
        }
        let mut types = Vec::new();
        let mut at = types_start;
        while at < types_end {
            let (name, info, size_or_type) = (u32_at(at)?, u32_at(at + 4)?, u32_at(at + 8)?);
            let (kind, vlen) = ((info >> 24) & 0x1f, info & 0xffff);
            let data = at + 12;
            let trailing = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen as usize,
                KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen as usize,
                KIND_PTR | 7 | KIND_TYPEDEF | 9..=11 | KIND_FUNC | 16 | 18 => 0,
                _ => return Err(BtfError::UnknownKind { kind, id: types.len() + 1 }),
            };
            at = data + trailing;
            if at > types_end {
                return Err(BtfError::Truncated(at));
            }
            types.push(Entry { kind, kind_flag: info >> 31 == 1, name, vlen, size_or_type, data });
        }
        let mut btf = Self { bytes, strings, strings_len: str_len, types, by_name: HashMap::new() };
        for (i, t) in btf.types.iter().enumerate() {
            let name = btf.string(t.name);
            if !name.is_empty() {
                btf.by_name.entry((t.kind, name.to_string())).or_insert(i as u32 + 1);
            }
        }
        Ok(btf)
    }

    /// The running kernel's BTF.
    pub(crate) fn from_sys_fs() -> std::io::Result<Self> {
        let bytes = std::fs::read("/sys/kernel/btf/vmlinux")?;
        Self::parse(bytes).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    /// The NUL-terminated name at `offset`; "" for one longer than any kernel identifier
    /// (`KSYM_NAME_LEN`), so a hostile blob cannot make names (and the index) quadratic.
    fn string(&self, offset: u32) -> &str {
        const MAX_NAME: usize = 512;
        let start = self.strings + offset as usize;
        let end = (self.strings + self.strings_len).min(start.saturating_add(MAX_NAME + 1));
        let Some(s) = self.bytes.get(start..end) else { return "" };
        let Some(len) = s.iter().position(|&b| b == 0) else { return "" };
        std::str::from_utf8(&s[..len]).unwrap_or("")
    }

    fn word(&self, at: usize) -> u32 {
        self.bytes.get(at..at + 4).map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn entry(&self, id: u32) -> Option<&Entry> {
        self.types.get((id as usize).checked_sub(1)?)
    }

    fn named(&self, kind: u32, name: &str) -> Option<&Entry> {
        self.entry(*self.by_name.get(&(kind, name.to_string()))?)
    }

    /// Whether the kernel has the BTF tracepoint `name` (its `btf_trace_<name>` typedef).
    pub(crate) fn has_tracepoint(&self, name: &str) -> bool {
        self.named(KIND_TYPEDEF, &format!("btf_trace_{name}")).is_some()
    }

    /// The parameter count of the tracepoint `name`, its leading `void *` context excluded.
    pub(crate) fn tracepoint_params(&self, name: &str) -> Option<usize> {
        let typedef = self.named(KIND_TYPEDEF, &format!("btf_trace_{name}"))?;
        let ptr = self.entry(typedef.size_or_type).filter(|t| t.kind == KIND_PTR)?;
        let proto = self.entry(ptr.size_or_type).filter(|t| t.kind == KIND_FUNC_PROTO)?;
        (proto.vlen as usize).checked_sub(1)
    }

    /// The parameter count of the kernel function `name`, if it is in BTF (so attachable).
    pub(crate) fn function_params(&self, name: &str) -> Option<usize> {
        let func = self.named(KIND_FUNC, name)?;
        let proto = self.entry(func.size_or_type).filter(|t| t.kind == KIND_FUNC_PROTO)?;
        Some(proto.vlen as usize)
    }

    /// Whether `enum enum_name` has the enumerator `variant` (helpers and map types the kernel
    /// knows are enumerators of `bpf_func_id` and `bpf_map_type`).
    pub(crate) fn enum_has(&self, enum_name: &str, variant: &str) -> bool {
        let (entry, width) = match self.named(KIND_ENUM, enum_name) {
            Some(e) => (e, 8),
            None => match self.named(KIND_ENUM64, enum_name) {
                Some(e) => (e, 12),
                None => return false,
            },
        };
        (0..entry.vlen as usize).any(|i| self.string(self.word(entry.data + i * width)) == variant)
    }

    /// `sizeof(struct name)`.
    pub(crate) fn struct_size(&self, name: &str) -> Option<u32> {
        self.named(KIND_STRUCT, name).map(|s| s.size_or_type)
    }

    /// `offsetof(struct name, member)` in bytes: a member of the struct itself or of one of its
    /// anonymous structs and unions (where randomized layouts put `task_struct`'s fields).
    pub(crate) fn member_offset(&self, name: &str, member: &str) -> Option<u32> {
        self.member_offset_in(self.named(KIND_STRUCT, name)?, member, 0)
    }

    fn member_offset_in(&self, s: &Entry, member: &str, depth: u32) -> Option<u32> {
        (0..s.vlen as usize).find_map(|i| {
            let at = s.data + i * 12;
            let bits = self.word(at + 8);
            // With kind_flag the top 8 bits are a bitfield's size.
            let offset = (if s.kind_flag { bits & 0x00ff_ffff } else { bits }) / 8;
            let name = self.word(at);
            if name != 0 {
                return (self.string(name) == member).then_some(offset);
            }
            // An anonymous member: look inside it (through modifiers), a few levels at most.
            let inner = self.resolve(self.word(at + 4))?;
            let nested = depth < 4 && matches!(inner.kind, KIND_STRUCT | KIND_UNION);
            if nested { Some(offset + self.member_offset_in(inner, member, depth + 1)?) } else { None }
        })
    }

    /// The type `id` names, through typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> Option<&Entry> {
        for _ in 0..8 {
            let t = self.entry(id)?;
            if !matches!(t.kind, KIND_TYPEDEF | 9..=11 | 18) {
                return Some(t);
            }
            id = t.size_or_type;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob built by hand: `struct s { int a; long b; }`, `enum e { X, Y }`, a function
    /// `f(int, int)` and the tracepoint typedef `btf_trace_tp` of `(void *, int)`.
    fn sample() -> Vec<u8> {
        let strings = b"\0s\0a\0b\0e\0X\0Y\0f\0btf_trace_tp\0int\0inner\0";
        let off = |name: &str| {
            let pos = strings
                .windows(name.len() + 1)
                .position(|w| &w[..name.len()] == name.as_bytes() && w[name.len()] == 0);
            pos.unwrap() as u32
        };
        let info = |kind: u32, vlen: u32| (kind << 24) | vlen;
        let mut types: Vec<u32> = Vec::new();
        // 1: int
        types.extend([off("int"), info(KIND_INT, 0), 4, 32]);
        // 2: struct s { int a; int b @ 64 bits; struct { int inner @ 64 } @ 128 bits (type 8) }
        types.extend([off("s"), info(KIND_STRUCT, 3), 32, off("a"), 1, 0, off("b"), 1, 64, 0, 8, 128]);
        // 3: enum e { X = 0, Y = 1 }
        types.extend([off("e"), info(KIND_ENUM, 2), 4, off("X"), 0, off("Y"), 1]);
        // 4: proto (int, int)
        types.extend([0, info(KIND_FUNC_PROTO, 2), 1, 0, 1, 0, 1]);
        // 5: func f
        types.extend([off("f"), info(KIND_FUNC, 0), 4]);
        // 6: ptr to 4, 7: typedef btf_trace_tp -> 6
        types.extend([0, info(KIND_PTR, 0), 4, off("btf_trace_tp"), info(KIND_TYPEDEF, 0), 6]);
        // 8: the anonymous struct { int pad; int inner @ 64 bits }
        types.extend([0, info(KIND_STRUCT, 2), 16, 0, 1, 0, off("inner"), 1, 64]);
        let types: Vec<u8> = types.iter().flat_map(|w| w.to_le_bytes()).collect();
        let mut out = Vec::new();
        out.extend(MAGIC.to_le_bytes());
        out.extend([1u8, 0]);
        for w in [24u32, 0, types.len() as u32, types.len() as u32, strings.len() as u32] {
            out.extend(w.to_le_bytes());
        }
        out.extend(types);
        out.extend(strings);
        out
    }

    #[test]
    fn answers_each_query_from_a_hand_built_blob() {
        let btf = KernelBtf::parse(sample()).unwrap();
        assert_eq!(btf.struct_size("s"), Some(32));
        assert_eq!(btf.member_offset("s", "b"), Some(8));
        assert_eq!(btf.member_offset("s", "c"), None);
        assert_eq!(btf.member_offset("s", "inner"), Some(24), "inside an anonymous struct at 16");
        assert!(btf.enum_has("e", "Y") && !btf.enum_has("e", "Z"));
        assert_eq!(btf.function_params("f"), Some(2));
        assert_eq!(btf.function_params("g"), None);
        assert!(btf.has_tracepoint("tp"));
        assert_eq!(btf.tracepoint_params("tp"), Some(1));
    }

    #[test]
    fn malformed_blobs_are_errors() {
        assert_eq!(KernelBtf::parse(vec![0; 10]).err(), Some(BtfError::Header));
        let mut cut = sample();
        cut.truncate(40);
        assert!(KernelBtf::parse(cut).is_err());
        let mut bad_kind = sample();
        bad_kind[24 + 7] = 0x1e;
        assert!(matches!(KernelBtf::parse(bad_kind), Err(BtfError::UnknownKind { .. })));
        // Every prefix: an error or a parse, never a panic.
        let whole = sample();
        for n in 0..whole.len() {
            let _ = KernelBtf::parse(whole[..n].to_vec());
        }
    }

    #[test]
    fn reads_this_machine_s_kernel() {
        let Ok(btf) = KernelBtf::from_sys_fs() else { return };
        assert!(btf.has_tracepoint("sched_switch"));
        assert!(btf.enum_has("bpf_func_id", "BPF_FUNC_map_lookup_elem"));
        assert!(btf.member_offset("task_struct", "pid").is_some());
        assert!(btf.struct_size("pt_regs").is_some_and(|s| s >= 168));
        assert_eq!(btf.function_params("inet_recvmsg"), Some(4));
    }
}
