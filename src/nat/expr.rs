//! nf_tables expressions for cutover's rules, built over `nftnl_sys`.
//!
//! nftnl's safe expressions hard-wire the 128-bit register 1 and know nothing of `fib`,
//! maps or concatenations, so every expression cutover sends is a [`RawExpr`]: a kernel
//! expression name plus its attributes, exactly what `nft --debug=netlink` prints.
//! [`rule_exprs`] translates a [`plan::Rule`](crate::plan::Rule) into that list; it is
//! pure so unit tests pin the register layout without root.

use std::ffi::{c_void, CStr, CString};
use std::net::{IpAddr, Ipv4Addr};
use std::ptr::NonNull;

use nftnl::expr::Expression;
use nftnl::nftnl_sys as sys;

use super::NatError;
use crate::plan::{Family, Rule};

/// 128-bit register 1; as a 32-bit register view it is `REG32_00..03`.
pub const NFT_REG_1: u32 = libc::NFT_REG_1 as u32;
/// 128-bit register 3 (`REG32_08..11`): scratch space that does not overlap the map
/// value the lookup leaves in `REG32_00/01`.
pub const NFT_REG_3: u32 = libc::NFT_REG_3 as u32;
pub const NFT_REG32_00: u32 = libc::NFT_REG32_00 as u32;
pub const NFT_REG32_01: u32 = libc::NFT_REG32_00 as u32 + 1;
pub const NFT_REG32_02: u32 = libc::NFT_REG32_00 as u32 + 2;
/// 128-bit register 2 starts at `REG32_04`: where an IPv6 map value's port lands.
pub const NFT_REG_2: u32 = libc::NFT_REG_2 as u32;

// Not in the libc crate (linux/netfilter/nf_tables.h).
/// `NFT_FIB_RESULT_ADDRTYPE`: the fib expression returns the route type.
const NFT_FIB_RESULT_ADDRTYPE: u32 = 3;
/// `NFTA_FIB_F_DADDR`: look up the destination address.
const NFTA_FIB_F_DADDR: u32 = 1 << 1;
/// `IPS_DST_NAT` of `enum ip_conntrack_status`: the connection's destination was NAT'd.
pub const IPS_DST_NAT: u32 = 1 << 5;
/// `IP_CT_DIR_ORIGINAL`: the tuple of the direction that opened the connection.
const IP_CT_DIR_ORIGINAL: u8 = 0;
/// Maximum interface name length including the NUL (`IFNAMSIZ`).
pub const IFNAMSIZ: usize = 16;

/// One attribute value of a [`RawExpr`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attr {
    U8(u8),
    U32(u32),
    Bytes(Vec<u8>),
    Str(CString),
}

/// A kernel expression: its name (`"cmp"`, `"lookup"`, ...) and `NFTNL_EXPR_*` attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawExpr {
    name: &'static CStr,
    attrs: Vec<(u32, Attr)>,
}

impl RawExpr {
    fn new(name: &'static CStr, attrs: Vec<(u32, Attr)>) -> Self {
        RawExpr { name, attrs }
    }

    /// The kernel name of the expression (for tests and debugging).
    pub fn name(&self) -> &str {
        self.name.to_str().unwrap_or("?")
    }

    /// The value of attribute `attr`, if set.
    pub fn attr(&self, attr: u32) -> Option<&Attr> {
        self.attrs.iter().find(|(a, _)| *a == attr).map(|(_, v)| v)
    }
}

impl Expression for RawExpr {
    fn to_expr(&self, _rule: &nftnl::Rule) -> NonNull<sys::nftnl_expr> {
        // SAFETY: `self.name` is a NUL-terminated static string; libnftnl copies nothing
        // from it beyond the terminator and returns an owned expression or NULL.
        let raw = unsafe { sys::nftnl_expr_alloc(self.name.as_ptr()) };
        // NULL means out of memory or an expression name libnftnl does not know. Every
        // name used here is a constant from this module, so only OOM is left, for a
        // tiny allocation; nftnl's own expressions abort in that case too, and the trait
        // gives no way to return an error.
        let Some(expr) = NonNull::new(raw) else { std::process::abort() };
        for (attr, value) in &self.attrs {
            // Attribute ids are small constants; the u16 cast cannot truncate.
            let attr = *attr as u16;
            match value {
                // SAFETY: `expr` is a live expression we own; libnftnl copies the value.
                Attr::U32(v) => unsafe { sys::nftnl_expr_set_u32(expr.as_ptr(), attr, *v) },
                // SAFETY: as above; a u8 attribute (the ct direction) is set with its own
                // width, libnftnl copies exactly one byte.
                Attr::U8(v) => unsafe { sys::nftnl_expr_set_u8(expr.as_ptr(), attr, *v) },
                Attr::Bytes(bytes) => {
                    // SAFETY: the pointer and length describe `bytes`, which outlives the
                    // call; libnftnl copies at most `len` bytes into the expression.
                    unsafe {
                        sys::nftnl_expr_set(
                            expr.as_ptr(),
                            attr,
                            bytes.as_ptr().cast::<c_void>(),
                            bytes.len() as u32,
                        )
                    };
                }
                Attr::Str(s) => {
                    // SAFETY: `s` is NUL-terminated and outlives the call; libnftnl
                    // duplicates the string.
                    unsafe { sys::nftnl_expr_set_str(expr.as_ptr(), attr, s.as_ptr()) };
                }
            }
        }
        expr
    }
}

fn attr(id: u32, value: u32) -> (u32, Attr) {
    (id, Attr::U32(value))
}

/// `meta load <key> => reg <dreg>`
pub fn meta_load(key: i32, dreg: u32) -> RawExpr {
    RawExpr::new(
        c"meta",
        vec![attr(sys::NFTNL_EXPR_META_KEY, key as u32), attr(sys::NFTNL_EXPR_META_DREG, dreg)],
    )
}

/// `meta set <key> with reg <sreg>`
pub fn meta_set(key: i32, sreg: u32) -> RawExpr {
    RawExpr::new(
        c"meta",
        vec![attr(sys::NFTNL_EXPR_META_KEY, key as u32), attr(sys::NFTNL_EXPR_META_SREG, sreg)],
    )
}

/// `cmp <op> reg <sreg> <data>`
fn cmp(op: i32, sreg: u32, data: &[u8]) -> RawExpr {
    RawExpr::new(
        c"cmp",
        vec![
            attr(sys::NFTNL_EXPR_CMP_SREG, sreg),
            attr(sys::NFTNL_EXPR_CMP_OP, op as u32),
            (sys::NFTNL_EXPR_CMP_DATA, Attr::Bytes(data.to_vec())),
        ],
    )
}

/// `cmp eq reg <sreg> <data>`
pub fn cmp_eq(sreg: u32, data: &[u8]) -> RawExpr {
    cmp(libc::NFT_CMP_EQ, sreg, data)
}

/// `cmp neq reg <sreg> <data>`
pub fn cmp_neq(sreg: u32, data: &[u8]) -> RawExpr {
    cmp(libc::NFT_CMP_NEQ, sreg, data)
}

/// `ct load <key> [, dir original] => reg <dreg>`
pub fn ct_load(key: i32, original: bool, dreg: u32) -> RawExpr {
    let mut attrs = vec![attr(sys::NFTNL_EXPR_CT_KEY, key as u32), attr(sys::NFTNL_EXPR_CT_DREG, dreg)];
    if original {
        attrs.push((sys::NFTNL_EXPR_CT_DIR, Attr::U8(IP_CT_DIR_ORIGINAL)));
    }
    RawExpr::new(c"ct", attrs)
}

/// `ct set <key> with reg <sreg>`
pub fn ct_set(key: i32, sreg: u32) -> RawExpr {
    RawExpr::new(c"ct", vec![attr(sys::NFTNL_EXPR_CT_KEY, key as u32), attr(sys::NFTNL_EXPR_CT_SREG, sreg)])
}

/// `counter` (starting at zero).
pub fn counter() -> RawExpr {
    RawExpr::new(c"counter", Vec::new())
}

/// `fib daddr type => reg <dreg>`
pub fn fib_daddr_type(dreg: u32) -> RawExpr {
    RawExpr::new(
        c"fib",
        vec![
            attr(sys::NFTNL_EXPR_FIB_DREG, dreg),
            attr(sys::NFTNL_EXPR_FIB_RESULT, NFT_FIB_RESULT_ADDRTYPE),
            attr(sys::NFTNL_EXPR_FIB_FLAGS, NFTA_FIB_F_DADDR),
        ],
    )
}

/// `payload load <len>b @ <base> header + <offset> => reg <dreg>`
pub fn payload_load(base: i32, offset: u32, len: u32, dreg: u32) -> RawExpr {
    RawExpr::new(
        c"payload",
        vec![
            attr(sys::NFTNL_EXPR_PAYLOAD_DREG, dreg),
            attr(sys::NFTNL_EXPR_PAYLOAD_BASE, base as u32),
            attr(sys::NFTNL_EXPR_PAYLOAD_OFFSET, offset),
            attr(sys::NFTNL_EXPR_PAYLOAD_LEN, len),
        ],
    )
}

/// `bitwise reg <dreg> = (reg <sreg> & mask) ^ xor` on 32 bits.
pub fn bitwise32(sreg: u32, dreg: u32, mask: [u8; 4], xor: [u8; 4]) -> RawExpr {
    RawExpr::new(
        c"bitwise",
        vec![
            attr(sys::NFTNL_EXPR_BITWISE_SREG, sreg),
            attr(sys::NFTNL_EXPR_BITWISE_DREG, dreg),
            attr(sys::NFTNL_EXPR_BITWISE_LEN, 4),
            (sys::NFTNL_EXPR_BITWISE_MASK, Attr::Bytes(mask.to_vec())),
            (sys::NFTNL_EXPR_BITWISE_XOR, Attr::Bytes(xor.to_vec())),
        ],
    )
}

/// `lookup reg <sreg> set <set> [dreg <dreg>]`: breaks the rule when the key is missing.
pub fn lookup(sreg: u32, set: &CStr, set_id: u32, dreg: Option<u32>) -> RawExpr {
    let mut attrs = vec![
        attr(sys::NFTNL_EXPR_LOOKUP_SREG, sreg),
        (sys::NFTNL_EXPR_LOOKUP_SET, Attr::Str(set.to_owned())),
        attr(sys::NFTNL_EXPR_LOOKUP_SET_ID, set_id),
    ];
    if let Some(dreg) = dreg {
        attrs.push(attr(sys::NFTNL_EXPR_LOOKUP_DREG, dreg));
    }
    RawExpr::new(c"lookup", attrs)
}

/// `nat dnat ip|ip6 addr_min reg <addr> proto_min reg <proto>`
pub fn dnat(family: Family, addr_reg: u32, proto_reg: u32) -> RawExpr {
    let nfproto = match family {
        Family::Ipv4 => libc::NFPROTO_IPV4,
        Family::Ipv6 => libc::NFPROTO_IPV6,
    };
    RawExpr::new(
        c"nat",
        vec![
            attr(sys::NFTNL_EXPR_NAT_TYPE, libc::NFT_NAT_DNAT as u32),
            attr(sys::NFTNL_EXPR_NAT_FAMILY, nfproto as u32),
            attr(sys::NFTNL_EXPR_NAT_REG_ADDR_MIN, addr_reg),
            attr(sys::NFTNL_EXPR_NAT_REG_PROTO_MIN, proto_reg),
        ],
    )
}

/// `nat dnat ip addr_min reg <addr> proto_min reg <proto>`
pub fn dnat_ipv4(addr_reg: u32, proto_reg: u32) -> RawExpr {
    dnat(Family::Ipv4, addr_reg, proto_reg)
}

/// `immediate reg 0 return`: the verdict `return` (in a base chain: its policy).
pub fn verdict_return() -> RawExpr {
    RawExpr::new(
        c"immediate",
        vec![
            attr(sys::NFTNL_EXPR_IMM_DREG, libc::NFT_REG_VERDICT as u32),
            attr(sys::NFTNL_EXPR_IMM_VERDICT, libc::NFT_RETURN as u32),
        ],
    )
}

/// `masq`
pub fn masquerade() -> RawExpr {
    RawExpr::new(c"masq", Vec::new())
}

/// `meta nfproto ipv4|ipv6`
fn nfproto(family: Family) -> [RawExpr; 2] {
    let p = match family {
        Family::Ipv4 => libc::NFPROTO_IPV4,
        Family::Ipv6 => libc::NFPROTO_IPV6,
    };
    [meta_load(libc::NFT_META_NFPROTO, NFT_REG_1), cmp_eq(NFT_REG_1, &[p as u8])]
}

/// Where the parts of a DNAT map key go (`[daddr .] l4proto . dport`, each part padded
/// to whole 32-bit registers, consecutive from REG32_00) and where the lookup leaves the
/// value's port: right after the address (REG32_01 for IPv4, REG32_04 for IPv6), exactly
/// the layout `nft --debug=netlink` shows for the same rule.
struct KeyLayout {
    daddr: Option<(u32, u32, u32)>,
    l4proto: u32,
    dport: u32,
    value_port: u32,
}

fn key_layout(family: Family, by_daddr: bool) -> KeyLayout {
    // (payload offset of the destination address, its length)
    let (offset, len, words) = match family {
        Family::Ipv4 => (16, 4, 1),
        Family::Ipv6 => (24, 16, 4),
    };
    let first = if by_daddr { NFT_REG32_00 + words } else { NFT_REG32_00 };
    KeyLayout {
        daddr: by_daddr.then_some((offset, len, NFT_REG32_00)),
        l4proto: first,
        dport: first + 1,
        value_port: match family {
            Family::Ipv4 => NFT_REG32_01,
            Family::Ipv6 => NFT_REG_2,
        },
    }
}

/// `meta mark & mark == mark`
fn mark_is_set(mark: u32) -> [RawExpr; 3] {
    // The mark is a host-order integer in the register.
    let m = mark.to_ne_bytes();
    [meta_load(libc::NFT_META_MARK, NFT_REG_1), bitwise32(NFT_REG_1, NFT_REG_1, m, [0; 4]), cmp_eq(NFT_REG_1, &m)]
}

/// `ip saddr <subnet>/<prefix>`: payload, mask, compare (addresses in network order).
fn saddr_in(subnet: Ipv4Addr, prefix: u8) -> Result<[RawExpr; 3], NatError> {
    if prefix > 32 {
        return Err(NatError::InvalidRule(format!("prefix /{prefix} of {subnet} is longer than 32 bits")));
    }
    let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix)) };
    let net = u32::from(subnet) & mask;
    Ok([
        payload_load(libc::NFT_PAYLOAD_NETWORK_HEADER, 12, 4, NFT_REG_1),
        bitwise32(NFT_REG_1, NFT_REG_1, mask.to_be_bytes(), [0; 4]),
        cmp_eq(NFT_REG_1, &net.to_be_bytes()),
    ])
}

/// `oifname "<ifname>"`: the kernel compares all 16 bytes, so pad with NULs for an
/// exact match (no wildcard).
fn oifname_is(ifname: &str) -> Result<[RawExpr; 2], NatError> {
    if ifname.is_empty() || ifname.len() >= IFNAMSIZ || ifname.contains('\0') {
        return Err(NatError::InvalidRule(format!(
            "interface name `{ifname}` must be 1 to {} bytes without NUL",
            IFNAMSIZ - 1
        )));
    }
    let mut name = [0u8; IFNAMSIZ];
    name[..ifname.len()].copy_from_slice(ifname.as_bytes());
    Ok([meta_load(libc::NFT_META_OIFNAME, NFT_REG_1), cmp_eq(NFT_REG_1, &name)])
}

/// `iifname "<ifname>"`, exact like [`oifname_is`].
fn iifname_is(ifname: &str) -> Result<[RawExpr; 2], NatError> {
    let [_, cmp] = oifname_is(ifname)?;
    Ok([meta_load(libc::NFT_META_IIFNAME, NFT_REG_1), cmp])
}

/// The expressions of `rule`. `map_id` is the id the rule's map got in the same batch.
pub fn rule_exprs(rule: &Rule, map_id: u32) -> Result<Vec<RawExpr>, NatError> {
    let mut out = Vec::new();
    match rule {
        Rule::DnatLocal { map, mark, family, by_daddr } => {
            let map = CString::new(map.as_str())
                .map_err(|_| NatError::InvalidRule(format!("map name {map:?} contains NUL")))?;
            out.extend(nfproto(*family));
            // fib daddr type local
            out.push(fib_daddr_type(NFT_REG_1));
            out.push(cmp_eq(NFT_REG_1, &u32::from(libc::RTN_LOCAL).to_ne_bytes()));
            // The key in consecutive 32-bit registers (the kernel zeroes the padding when
            // it loads fewer bytes than a register holds).
            let layout = key_layout(*family, *by_daddr);
            if let Some((offset, len, reg)) = layout.daddr {
                out.push(payload_load(libc::NFT_PAYLOAD_NETWORK_HEADER, offset, len, reg));
            }
            out.push(meta_load(libc::NFT_META_L4PROTO, layout.l4proto));
            out.push(payload_load(libc::NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2, layout.dport));
            // One map lookup: it breaks the rule for keys not in the map (so unrelated
            // packets are never marked) and leaves `addr . port` from REG32_00 on.
            out.push(lookup(NFT_REG32_00, &map, map_id, Some(NFT_REG_1)));
            // meta mark set meta mark | mark, computed in register 3 (REG32_08..11) so it
            // does not overwrite the map value (at most REG32_00..04).
            out.push(meta_load(libc::NFT_META_MARK, NFT_REG_3));
            out.push(bitwise32(NFT_REG_3, NFT_REG_3, (!mark).to_ne_bytes(), mark.to_ne_bytes()));
            out.push(meta_set(libc::NFT_META_MARK, NFT_REG_3));
            // ct mark set ct mark | mark: the connection keeps the mark, for the packets
            // after this one, which never pass a nat chain (see `Rule::RestoreMark`). Before
            // the DNAT, which ends the rule.
            out.push(ct_load(libc::NFT_CT_MARK, false, NFT_REG_3));
            out.push(bitwise32(NFT_REG_3, NFT_REG_3, (!mark).to_ne_bytes(), mark.to_ne_bytes()));
            out.push(ct_set(libc::NFT_CT_MARK, NFT_REG_3));
            out.push(dnat(*family, NFT_REG_1, layout.value_port));
        }
        Rule::LeaveLoopback6 => {
            out.extend(nfproto(Family::Ipv6));
            // ip6 daddr ::1
            out.push(payload_load(libc::NFT_PAYLOAD_NETWORK_HEADER, 24, 16, NFT_REG_1));
            out.push(cmp_eq(NFT_REG_1, &std::net::Ipv6Addr::LOCALHOST.octets()));
            out.push(verdict_return());
        }
        Rule::RestoreMark { mark } => {
            // ct direction original: replies keep whatever mark they have.
            out.push(ct_load(libc::NFT_CT_DIRECTION, false, NFT_REG_1));
            out.push(cmp_eq(NFT_REG_1, &[IP_CT_DIR_ORIGINAL]));
            // ct mark & mark == mark
            out.push(ct_load(libc::NFT_CT_MARK, false, NFT_REG_1));
            out.push(bitwise32(NFT_REG_1, NFT_REG_1, mark.to_ne_bytes(), [0; 4]));
            out.push(cmp_eq(NFT_REG_1, &mark.to_ne_bytes()));
            // meta mark set meta mark | mark
            out.push(meta_load(libc::NFT_META_MARK, NFT_REG_1));
            out.push(bitwise32(NFT_REG_1, NFT_REG_1, (!mark).to_ne_bytes(), mark.to_ne_bytes()));
            out.push(meta_set(libc::NFT_META_MARK, NFT_REG_1));
        }
        Rule::MasqueradeLoopback { mark } => {
            out.extend(nfproto(Family::Ipv4));
            out.extend(mark_is_set(*mark));
            out.extend(saddr_in(Ipv4Addr::new(127, 0, 0, 0), 8)?);
            out.push(masquerade());
        }
        Rule::MasqueradeHairpin { mark, ifname, subnet, prefix } => {
            out.extend(nfproto(Family::Ipv4));
            out.extend(mark_is_set(*mark));
            out.extend(oifname_is(ifname)?);
            out.extend(saddr_in(*subnet, *prefix)?);
            out.push(masquerade());
        }
        Rule::MasqueradeHairpin6 { mark, ifname } => {
            out.extend(nfproto(Family::Ipv6));
            out.extend(mark_is_set(*mark));
            out.extend(iifname_is(ifname)?);
            out.extend(oifname_is(ifname)?);
            out.push(masquerade());
        }
        Rule::CountService { protocol, port, daddr, .. } => {
            // ct status dnat: first, it sends every packet that is not ours on at once.
            out.push(ct_load(libc::NFT_CT_STATUS, false, NFT_REG_1));
            out.push(bitwise32(NFT_REG_1, NFT_REG_1, IPS_DST_NAT.to_ne_bytes(), [0; 4]));
            out.push(cmp_neq(NFT_REG_1, &[0; 4]));
            match daddr {
                Some(IpAddr::V4(a)) => {
                    out.extend(nfproto(Family::Ipv4));
                    out.push(ct_load(libc::NFT_CT_DST_IP, true, NFT_REG_1));
                    out.push(cmp_eq(NFT_REG_1, &a.octets()));
                }
                Some(IpAddr::V6(a)) => {
                    out.extend(nfproto(Family::Ipv6));
                    out.push(ct_load(libc::NFT_CT_DST_IP6, true, NFT_REG_1));
                    out.push(cmp_eq(NFT_REG_1, &a.octets()));
                }
                None => {}
            }
            out.push(meta_load(libc::NFT_META_L4PROTO, NFT_REG_1));
            out.push(cmp_eq(NFT_REG_1, &[protocol.number()]));
            // The original tuple's destination port is the host port in both directions.
            out.push(ct_load(libc::NFT_CT_PROTO_DST, true, NFT_REG_1));
            out.push(cmp_eq(NFT_REG_1, &port.to_be_bytes()));
            out.push(counter());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u32_attr(e: &RawExpr, a: u32) -> u32 {
        match e.attr(a) {
            Some(Attr::U32(v)) => *v,
            other => panic!("{} attr {a}: {other:?}", e.name()),
        }
    }

    fn bytes_attr(e: &RawExpr, a: u32) -> Vec<u8> {
        match e.attr(a) {
            Some(Attr::Bytes(v)) => v.clone(),
            other => panic!("{} attr {a}: {other:?}", e.name()),
        }
    }

    #[test]
    fn dnat_rule_keeps_map_value_out_of_the_mark_register() {
        let rule = Rule::DnatLocal { map: "dnat4".into(), mark: 0x2000_0000, family: Family::Ipv4, by_daddr: false };
        let e = rule_exprs(&rule, 1).unwrap();
        let names: Vec<_> = e.iter().map(RawExpr::name).collect();
        assert_eq!(
            names,
            ["meta", "cmp", "fib", "cmp", "meta", "payload", "lookup", "meta", "bitwise", "meta", "ct", "bitwise", "ct", "nat"]
        );
        assert_eq!(u32_attr(&e[6], sys::NFTNL_EXPR_LOOKUP_SREG), NFT_REG32_00);
        assert_eq!(u32_attr(&e[6], sys::NFTNL_EXPR_LOOKUP_DREG), NFT_REG_1);
        assert_eq!(u32_attr(&e[5], sys::NFTNL_EXPR_PAYLOAD_DREG), NFT_REG32_01);
        // The mark is computed in register 3, which does not overlap REG32_00/01.
        assert_eq!(u32_attr(&e[7], sys::NFTNL_EXPR_META_DREG), NFT_REG_3);
        assert_eq!(bytes_attr(&e[8], sys::NFTNL_EXPR_BITWISE_MASK), 0xdfff_ffffu32.to_ne_bytes());
        assert_eq!(bytes_attr(&e[8], sys::NFTNL_EXPR_BITWISE_XOR), 0x2000_0000u32.to_ne_bytes());
        // The connection gets the same bit, computed in register 3 as well.
        assert_eq!(u32_attr(&e[10], sys::NFTNL_EXPR_CT_KEY), libc::NFT_CT_MARK as u32);
        assert_eq!(u32_attr(&e[10], sys::NFTNL_EXPR_CT_DREG), NFT_REG_3);
        assert_eq!(bytes_attr(&e[11], sys::NFTNL_EXPR_BITWISE_XOR), 0x2000_0000u32.to_ne_bytes());
        assert_eq!(u32_attr(&e[12], sys::NFTNL_EXPR_CT_SREG), NFT_REG_3);
        // REG_1 and REG32_00 name the same bytes.
        assert_eq!(u32_attr(&e[13], sys::NFTNL_EXPR_NAT_REG_ADDR_MIN), NFT_REG_1);
        assert_eq!(u32_attr(&e[13], sys::NFTNL_EXPR_NAT_REG_PROTO_MIN), NFT_REG32_01);
    }

    #[test]
    fn loopback6_returns_before_any_nat() {
        let e = rule_exprs(&Rule::LeaveLoopback6, 0).unwrap();
        let names: Vec<_> = e.iter().map(RawExpr::name).collect();
        assert_eq!(names, ["meta", "cmp", "payload", "cmp", "immediate"]);
        assert_eq!(bytes_attr(&e[1], sys::NFTNL_EXPR_CMP_DATA), [libc::NFPROTO_IPV6 as u8]);
        // ip6 daddr: 16 bytes at offset 24 of the network header.
        assert_eq!(u32_attr(&e[2], sys::NFTNL_EXPR_PAYLOAD_OFFSET), 24);
        assert_eq!(u32_attr(&e[2], sys::NFTNL_EXPR_PAYLOAD_LEN), 16);
        assert_eq!(bytes_attr(&e[3], sys::NFTNL_EXPR_CMP_DATA), std::net::Ipv6Addr::LOCALHOST.octets());
        assert_eq!(u32_attr(&e[4], sys::NFTNL_EXPR_IMM_DREG), libc::NFT_REG_VERDICT as u32);
        assert_eq!(u32_attr(&e[4], sys::NFTNL_EXPR_IMM_VERDICT), libc::NFT_RETURN as u32);
    }

    #[test]
    fn restore_mark_copies_the_connection_mark_in_the_original_direction() {
        let e = rule_exprs(&Rule::RestoreMark { mark: 0x0400_0000 }, 0).unwrap();
        let names: Vec<_> = e.iter().map(RawExpr::name).collect();
        assert_eq!(names, ["ct", "cmp", "ct", "bitwise", "cmp", "meta", "bitwise", "meta"]);
        assert_eq!(u32_attr(&e[0], sys::NFTNL_EXPR_CT_KEY), libc::NFT_CT_DIRECTION as u32);
        assert_eq!(bytes_attr(&e[1], sys::NFTNL_EXPR_CMP_DATA), [0]);
        assert_eq!(u32_attr(&e[2], sys::NFTNL_EXPR_CT_KEY), libc::NFT_CT_MARK as u32);
        assert_eq!(bytes_attr(&e[3], sys::NFTNL_EXPR_BITWISE_MASK), 0x0400_0000u32.to_ne_bytes());
        assert_eq!(bytes_attr(&e[4], sys::NFTNL_EXPR_CMP_DATA), 0x0400_0000u32.to_ne_bytes());
        assert_eq!(bytes_attr(&e[6], sys::NFTNL_EXPR_BITWISE_MASK), (!0x0400_0000u32).to_ne_bytes());
        assert_eq!(u32_attr(&e[7], sys::NFTNL_EXPR_META_SREG), NFT_REG_1);
    }

    #[test]
    fn hairpin_matches_exact_ifname_and_subnet() {
        let rule = Rule::MasqueradeHairpin {
            mark: 1,
            ifname: "docker0".into(),
            subnet: Ipv4Addr::new(172, 17, 3, 4),
            prefix: 20,
        };
        let e = rule_exprs(&rule, 1).unwrap();
        assert_eq!(bytes_attr(&e[6], sys::NFTNL_EXPR_CMP_DATA), b"docker0\0\0\0\0\0\0\0\0\0");
        assert_eq!(bytes_attr(&e[8], sys::NFTNL_EXPR_BITWISE_MASK), [255, 255, 240, 0]);
        assert_eq!(bytes_attr(&e[9], sys::NFTNL_EXPR_CMP_DATA), [172, 17, 0, 0]);
        assert_eq!(e.last().unwrap().name(), "masq");
    }

    #[test]
    fn count_rule_matches_dnat_status_and_the_original_tuple() {
        let rule = Rule::CountService {
            service: "web".into(),
            protocol: crate::manifest::Protocol::Udp,
            port: 8080,
            daddr: Some("192.0.2.10".parse().unwrap()),
        };
        let e = rule_exprs(&rule, 0).unwrap();
        let names: Vec<_> = e.iter().map(RawExpr::name).collect();
        assert_eq!(names, ["ct", "bitwise", "cmp", "meta", "cmp", "ct", "cmp", "meta", "cmp", "ct", "cmp", "counter"]);
        assert_eq!(u32_attr(&e[0], sys::NFTNL_EXPR_CT_KEY), libc::NFT_CT_STATUS as u32);
        assert_eq!(e[0].attr(sys::NFTNL_EXPR_CT_DIR), None, "status has no direction");
        assert_eq!(bytes_attr(&e[1], sys::NFTNL_EXPR_BITWISE_MASK), 0x20u32.to_ne_bytes());
        assert_eq!(u32_attr(&e[2], sys::NFTNL_EXPR_CMP_OP), libc::NFT_CMP_NEQ as u32);
        assert_eq!(u32_attr(&e[5], sys::NFTNL_EXPR_CT_KEY), libc::NFT_CT_DST_IP as u32);
        assert_eq!(e[5].attr(sys::NFTNL_EXPR_CT_DIR), Some(&Attr::U8(0)));
        assert_eq!(bytes_attr(&e[6], sys::NFTNL_EXPR_CMP_DATA), [192, 0, 2, 10]);
        assert_eq!(bytes_attr(&e[8], sys::NFTNL_EXPR_CMP_DATA), [17]);
        assert_eq!(u32_attr(&e[9], sys::NFTNL_EXPR_CT_KEY), libc::NFT_CT_PROTO_DST as u32);
        assert_eq!(bytes_attr(&e[10], sys::NFTNL_EXPR_CMP_DATA), 8080u16.to_be_bytes());
    }

    #[test]
    fn bad_names_and_prefixes_are_refused() {
        let long = Rule::MasqueradeHairpin { mark: 1, ifname: "a-very-long-ifname".into(), subnet: Ipv4Addr::UNSPECIFIED, prefix: 8 };
        assert!(matches!(rule_exprs(&long, 1), Err(NatError::InvalidRule(_))));
        let prefix = Rule::MasqueradeHairpin { mark: 1, ifname: "br0".into(), subnet: Ipv4Addr::UNSPECIFIED, prefix: 33 };
        assert!(matches!(rule_exprs(&prefix, 1), Err(NatError::InvalidRule(_))));
    }

    #[test]
    fn ipv6_by_address_matches_nft_layout() {
        // `nft --debug=netlink` for `ip6 daddr . meta l4proto . th dport map @m6`:
        // payload 16b @ network + 24 => reg 1, l4proto => reg 2 (REG32_04), dport =>
        // reg 13 (REG32_05), lookup reg 1 dreg 1, dnat ip6 addr_min reg 1 proto_min reg 2.
        let rule = Rule::DnatLocal { map: "dnat6_addr".into(), mark: 1, family: Family::Ipv6, by_daddr: true };
        let e = rule_exprs(&rule, 3).unwrap();
        let names: Vec<_> = e.iter().map(RawExpr::name).collect();
        assert_eq!(
            names,
            ["meta", "cmp", "fib", "cmp", "payload", "meta", "payload", "lookup", "meta", "bitwise", "meta", "ct", "bitwise", "ct", "nat"]
        );
        assert_eq!(bytes_attr(&e[1], sys::NFTNL_EXPR_CMP_DATA), [libc::NFPROTO_IPV6 as u8]);
        assert_eq!(u32_attr(&e[4], sys::NFTNL_EXPR_PAYLOAD_OFFSET), 24);
        assert_eq!(u32_attr(&e[4], sys::NFTNL_EXPR_PAYLOAD_LEN), 16);
        assert_eq!(u32_attr(&e[5], sys::NFTNL_EXPR_META_DREG), NFT_REG32_00 + 4);
        assert_eq!(u32_attr(&e[6], sys::NFTNL_EXPR_PAYLOAD_DREG), 13);
        assert_eq!(u32_attr(&e[14], sys::NFTNL_EXPR_NAT_FAMILY), libc::NFPROTO_IPV6 as u32);
        assert_eq!(u32_attr(&e[14], sys::NFTNL_EXPR_NAT_REG_PROTO_MIN), NFT_REG_2);
    }

    #[test]
    fn ipv4_by_address_loads_daddr_first() {
        let rule = Rule::DnatLocal { map: "dnat4_addr".into(), mark: 1, family: Family::Ipv4, by_daddr: true };
        let e = rule_exprs(&rule, 2).unwrap();
        assert_eq!(u32_attr(&e[4], sys::NFTNL_EXPR_PAYLOAD_OFFSET), 16);
        assert_eq!(u32_attr(&e[4], sys::NFTNL_EXPR_PAYLOAD_DREG), NFT_REG32_00);
        assert_eq!(u32_attr(&e[5], sys::NFTNL_EXPR_META_DREG), NFT_REG32_01);
        assert_eq!(u32_attr(&e[6], sys::NFTNL_EXPR_PAYLOAD_DREG), NFT_REG32_02);
        assert_eq!(u32_attr(&e[14], sys::NFTNL_EXPR_NAT_REG_PROTO_MIN), NFT_REG32_01);
    }
}
