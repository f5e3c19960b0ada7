//! The DNAT map and its elements as netlink messages (`nftnl_set` / `nftnl_set_elem`).
//!
//! nftnl's safe `Set` has no data type and its elements carry no data, so a map (a set
//! with `NFT_SET_MAP`) and map elements are written here over `nftnl_sys`.

use std::ffi::{c_char, c_void, CStr};
use std::ptr::NonNull;

use nftnl::nftnl_sys as sys;
use nftnl::{MsgType, NlMsg, ProtoFamily};

use std::net::IpAddr;

use crate::plan::{Element, ElementKey, Family};

/// Datatype ids of nftables (`enum datatypes` in nftables' datatype.h).
const TYPE_IPADDR: u32 = 7;
const TYPE_IP6ADDR: u32 = 8;
const TYPE_INET_PROTOCOL: u32 = 12;
const TYPE_INET_SERVICE: u32 = 13;
/// nftables' concatenated type: the part types shifted by 6 bits each, first part highest.
const CONCAT_TYPE_BITS: u32 = 6;

/// `inet_proto . inet_service`
pub const KEY_TYPE: u32 = (TYPE_INET_PROTOCOL << CONCAT_TYPE_BITS) | TYPE_INET_SERVICE;
/// `ipv4_addr . inet_service`
pub const DATA_TYPE: u32 = (TYPE_IPADDR << CONCAT_TYPE_BITS) | TYPE_INET_SERVICE;
/// Each part of a concatenation takes a whole 32-bit register: 4 + 4 bytes.
pub const KEY_LEN: u32 = 8;
pub const DATA_LEN: u32 = 8;

fn addr_type(family: Family) -> u32 {
    match family {
        Family::Ipv4 => TYPE_IPADDR,
        Family::Ipv6 => TYPE_IP6ADDR,
    }
}

fn addr_len(family: Family) -> u32 {
    match family {
        Family::Ipv4 => 4,
        Family::Ipv6 => 16,
    }
}

/// Key type and length of a map: `[addr .] inet_proto . inet_service`.
pub fn key_type(family: Family, by_daddr: bool) -> (u32, u32) {
    if by_daddr {
        ((addr_type(family) << (2 * CONCAT_TYPE_BITS)) | KEY_TYPE, addr_len(family) + KEY_LEN)
    } else {
        (KEY_TYPE, KEY_LEN)
    }
}

/// Data type and length of a map: `addr . inet_service`.
pub fn data_type(family: Family) -> (u32, u32) {
    ((addr_type(family) << CONCAT_TYPE_BITS) | TYPE_INET_SERVICE, addr_len(family) + 4)
}

/// Elements per NEWSETELEM/DELSETELEM message: the element list is one netlink attribute
/// whose length is 16 bits, and one element takes at most about 80 bytes (IPv6 keyed by
/// address), so 512 stays well below 64 KiB.
pub const ELEMENTS_PER_MESSAGE: usize = 512;

fn ip_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// Map key bytes: the host address when keyed by it, `l4proto` padded to 32 bits, then
/// the port in network order, padded.
pub fn key_bytes(key: &ElementKey) -> Vec<u8> {
    let p = key.port.to_be_bytes();
    let mut out = key.daddr.as_ref().map(ip_bytes).unwrap_or_default();
    out.extend([key.protocol.number(), 0, 0, 0, p[0], p[1], 0, 0]);
    out
}

/// Map value bytes: the address, then the port in network order, padded.
pub fn data_bytes(e: &Element) -> Vec<u8> {
    let p = e.port.to_be_bytes();
    let mut out = ip_bytes(&e.addr);
    out.extend([p[0], p[1], 0, 0]);
    out
}

/// An owned `nftnl_set` naming a set of a table; freed on drop.
struct RawSet(NonNull<sys::nftnl_set>);

impl RawSet {
    fn new(table: &CStr, name: &CStr) -> Self {
        // SAFETY: plain allocation; NULL is handled below.
        let raw = unsafe { sys::nftnl_set_alloc() };
        // Only fails on OOM for a tiny allocation; nftnl aborts in that case too and the
        // NlMsg trait has no error path.
        let Some(set) = NonNull::new(raw) else { std::process::abort() };
        // SAFETY: `set` is a live set we own; libnftnl copies the strings and values.
        unsafe {
            sys::nftnl_set_set_u32(set.as_ptr(), sys::NFTNL_SET_FAMILY as u16, ProtoFamily::Inet as u32);
            sys::nftnl_set_set_str(set.as_ptr(), sys::NFTNL_SET_TABLE as u16, table.as_ptr());
            sys::nftnl_set_set_str(set.as_ptr(), sys::NFTNL_SET_NAME as u16, name.as_ptr());
        }
        RawSet(set)
    }

    fn set_u32(&mut self, attr: u32, value: u32) {
        // SAFETY: `self.0` is a live set we own; the value is copied.
        unsafe { sys::nftnl_set_set_u32(self.0.as_ptr(), attr as u16, value) };
    }

    /// Append an element with `key` and, for adds, `data`.
    fn push_elem(&mut self, key: &[u8], data: Option<&[u8]>) {
        // SAFETY: plain allocation; NULL is handled below.
        let raw = unsafe { sys::nftnl_set_elem_alloc() };
        let Some(elem) = NonNull::new(raw) else { std::process::abort() };
        // SAFETY: `elem` is live and ours; pointer/length describe the slices, which
        // libnftnl copies. `nftnl_set_elem_add` then takes ownership of `elem` (it is
        // freed with the set), so it is not used or freed here afterwards.
        unsafe {
            sys::nftnl_set_elem_set(
                elem.as_ptr(),
                sys::NFTNL_SET_ELEM_KEY as u16,
                key.as_ptr().cast::<c_void>(),
                key.len() as u32,
            );
            if let Some(data) = data {
                sys::nftnl_set_elem_set(
                    elem.as_ptr(),
                    sys::NFTNL_SET_ELEM_DATA as u16,
                    data.as_ptr().cast::<c_void>(),
                    data.len() as u32,
                );
            }
            sys::nftnl_set_elem_add(self.0.as_ptr(), elem.as_ptr());
        }
    }
}

impl Drop for RawSet {
    fn drop(&mut self) {
        // SAFETY: we own the set (and through it its elements); it is freed once.
        unsafe { sys::nftnl_set_free(self.0.as_ptr()) };
    }
}

/// Write a netlink header of `msg_type` with `flags` at `buf`.
///
/// # Safety
/// `buf` must have room for `nft_nlmsg_maxsize()` bytes (the [`NlMsg`] contract).
unsafe fn header(buf: *mut c_void, msg_type: i32, flags: i32, seq: u32) -> *mut libc::nlmsghdr {
    // SAFETY: the caller guarantees `buf` is large enough for any nftables message.
    unsafe {
        sys::nftnl_nlmsg_build_hdr(
            buf.cast::<c_char>(),
            msg_type as u16,
            ProtoFamily::Inet as u16,
            flags as u16,
            seq,
        )
    }
}

/// A DNAT map: `[addr .] inet_proto . inet_service : addr . inet_service`.
pub struct MapMsg(RawSet);

impl MapMsg {
    /// `id` lets rules in the same batch refer to the map before it exists.
    pub fn new(table: &CStr, name: &CStr, id: u32, family: Family, by_daddr: bool) -> Self {
        let (ktype, klen) = key_type(family, by_daddr);
        let (dtype, dlen) = data_type(family);
        let mut set = RawSet::new(table, name);
        set.set_u32(sys::NFTNL_SET_ID, id);
        set.set_u32(sys::NFTNL_SET_FLAGS, libc::NFT_SET_MAP as u32);
        set.set_u32(sys::NFTNL_SET_KEY_TYPE, ktype);
        set.set_u32(sys::NFTNL_SET_KEY_LEN, klen);
        set.set_u32(sys::NFTNL_SET_DATA_TYPE, dtype);
        set.set_u32(sys::NFTNL_SET_DATA_LEN, dlen);
        MapMsg(set)
    }
}

// SAFETY: a set message without elements is a few hundred bytes, far below
// `nft_nlmsg_maxsize()`.
unsafe impl NlMsg for MapMsg {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, msg_type: MsgType) {
        let (ty, flags) = match msg_type {
            MsgType::Add => (libc::NFT_MSG_NEWSET, libc::NLM_F_CREATE | libc::NLM_F_ACK),
            MsgType::Del => (libc::NFT_MSG_DELSET, libc::NLM_F_ACK),
        };
        // SAFETY: the caller provides a buffer of `nft_nlmsg_maxsize()` bytes; the header
        // returned points into it and the set is live.
        unsafe {
            let nlh = header(buf, ty, flags, seq);
            sys::nftnl_set_nlmsg_build_payload(nlh, self.0 .0.as_ptr());
        }
    }
}

/// Up to [`ELEMENTS_PER_MESSAGE`] elements added to (with data) or deleted from a map.
/// The message type passed to [`NlMsg::write`] must match how it was built.
pub struct ElementsMsg {
    set: RawSet,
    len: usize,
}

impl ElementsMsg {
    pub fn new(table: &CStr, map: &CStr) -> Self {
        ElementsMsg { set: RawSet::new(table, map), len: 0 }
    }

    pub fn add(&mut self, e: &Element) {
        self.set.push_elem(&key_bytes(&e.key), Some(&data_bytes(e)));
        self.len += 1;
    }

    pub fn delete(&mut self, key: &ElementKey) {
        self.set.push_elem(&key_bytes(key), None);
        self.len += 1;
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

// SAFETY: callers keep at most ELEMENTS_PER_MESSAGE (about 40 KiB of attributes) in one
// message, below `nft_nlmsg_maxsize()`.
unsafe impl NlMsg for ElementsMsg {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, msg_type: MsgType) {
        // EXCL: adding a key that already exists is an error, never a silent overwrite;
        // a cutover deletes the old element in the same batch.
        let (ty, flags) = match msg_type {
            MsgType::Add => (libc::NFT_MSG_NEWSETELEM, libc::NLM_F_CREATE | libc::NLM_F_EXCL | libc::NLM_F_ACK),
            MsgType::Del => (libc::NFT_MSG_DELSETELEM, libc::NLM_F_ACK),
        };
        // SAFETY: as for MapMsg; the payload is bounded by ELEMENTS_PER_MESSAGE.
        unsafe {
            let nlh = header(buf, ty, flags, seq);
            sys::nftnl_set_elems_nlmsg_build_payload(nlh, self.set.0.as_ptr());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Protocol;
    use std::net::Ipv4Addr;

    #[test]
    fn types_match_nft() {
        // What `nft --debug=netlink` shows for this map type.
        assert_eq!(KEY_TYPE, 781);
        assert_eq!(DATA_TYPE, 461);
    }

    #[test]
    fn element_bytes_are_padded_per_register() {
        let e = Element { key: ElementKey::v4(Protocol::Tcp, 18080), addr: Ipv4Addr::new(10, 231, 0, 2).into(), port: 80 };
        // nft prints this element as `00000006 0000a046 : 0200e70a 00005000`.
        assert_eq!(key_bytes(&e.key), [6, 0, 0, 0, 0x46, 0xa0, 0, 0]);
        assert_eq!(data_bytes(&e), [10, 231, 0, 2, 0, 80, 0, 0]);
    }

    #[test]
    fn address_keyed_and_ipv6_maps_match_nft() {
        // nftables builds a concatenated type left to right, 6 bits per part.
        assert_eq!(key_type(Family::Ipv4, true), ((7 << 12) | (12 << 6) | 13, 12));
        assert_eq!(key_type(Family::Ipv6, true), ((8 << 12) | 781, 24));
        assert_eq!(data_type(Family::Ipv6), ((8 << 6) | 13, 20));
        let e = Element {
            key: ElementKey { family: Family::Ipv6, daddr: Some("fd00::1".parse().unwrap()), protocol: Protocol::Udp, port: 53 },
            addr: "fd00::2".parse().unwrap(),
            port: 5353,
        };
        let k = key_bytes(&e.key);
        assert_eq!(k.len(), 24);
        assert_eq!(&k[16..], [17, 0, 0, 0, 0, 53, 0, 0]);
        let d = data_bytes(&e);
        assert_eq!(d.len(), 20);
        assert_eq!(&d[16..], [0x14, 0xe9, 0, 0]);
    }
}
