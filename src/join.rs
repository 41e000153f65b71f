//! Joining from other devices: where phones on the LAN reach this server, and QR codes of it.
//!
//! This module owns three things: listing the machine's interface addresses
//! ([`interface_addresses`], `getifaddrs`), deciding which of them a device on the LAN can use
//! for a given `--bind` ([`lan_addresses`], pure), and rendering a URL as a QR code in SVG
//! ([`qr_svg`], pure, through the `qrcode` crate).
//!
//! It must not render QR codes on the event loop: one costs from about 0.7 ms (a short URL)
//! to several milliseconds (256 bytes) on this 2-core machine under load, which would delay
//! ticks. The page worker ([`crate::page_worker`]) renders them. Listing addresses is a few
//! system calls and is cheap enough for the loop, which still caches it (see `server`).

use std::ffi::CStr;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use qrcode::render::svg;
use qrcode::{EcLevel, QrCode};
use serde::Serialize;
use thiserror::Error;

use crate::room::RoomName;

/// The longest text `/qr.svg` encodes, in bytes. A URL of a LAN address is about 40 bytes; 256
/// leaves room for a host name and a query, and keeps the code (version 12 at most, level M)
/// easy for a phone to read off a screen.
pub const MAX_QR_TEXT: usize = 256;

/// An address of one of this machine's interfaces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceAddress {
    pub interface: String,
    pub ip: IpAddr,
    /// The interface is up and is not a loopback device.
    pub usable: bool,
}

/// Every address of every interface, from `getifaddrs(3)`.
pub fn interface_addresses() -> io::Result<Vec<InterfaceAddress>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list that we walk read-only and free once below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cursor = head;
    while !cursor.is_null() {
        // SAFETY: `cursor` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cursor };
        cursor = ifa.ifa_next;
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: a non-null ifa_addr points at a sockaddr whose family says its real type.
        let ip = unsafe {
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
                }
                libc::AF_INET6 => {
                    let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
                }
                _ => continue,
            }
        };
        let interface = if ifa.ifa_name.is_null() {
            String::new()
        } else {
            // SAFETY: ifa_name is a NUL-terminated string owned by the list.
            unsafe { CStr::from_ptr(ifa.ifa_name) }
                .to_string_lossy()
                .into_owned()
        };
        let flags = ifa.ifa_flags;
        let usable = flags & libc::IFF_UP as u32 != 0 && flags & libc::IFF_LOOPBACK as u32 == 0;
        out.push(InterfaceAddress {
            interface,
            ip,
            usable,
        });
    }
    // SAFETY: `head` came from getifaddrs and is freed exactly once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// The addresses another device on the network can reach a server bound to `bind` at, IPv4
/// first, without duplicates.
///
/// Bound to every IPv4 interface (`0.0.0.0`), that is every IPv4 address of an interface that
/// is up and not loopback. Bound to `::`, also the IPv6 ones (Linux binds `::` to both
/// families unless `net.ipv6.bindv6only` is set), except link-local `fe80::/10`: such a URL
/// needs a zone (`%eth0`) that browsers do not accept. Bound to one address, that address
/// (unless it is loopback, which no other device can reach).
pub fn lan_addresses(bind: IpAddr, interfaces: &[InterfaceAddress]) -> Vec<IpAddr> {
    if !bind.is_unspecified() {
        return if bind.is_loopback() {
            Vec::new()
        } else {
            vec![bind]
        };
    }
    let with_v6 = bind.is_ipv6();
    let mut v4: Vec<IpAddr> = Vec::new();
    let mut v6: Vec<IpAddr> = Vec::new();
    for a in interfaces.iter().filter(|a| a.usable) {
        match a.ip {
            IpAddr::V4(ip) if !ip.is_loopback() && !ip.is_unspecified() => v4.push(a.ip),
            IpAddr::V6(ip)
                if with_v6
                    && !ip.is_loopback()
                    && !ip.is_unspecified()
                    && !ip.is_unicast_link_local()
                    && !ip.is_multicast() =>
            {
                v6.push(a.ip)
            }
            _ => {}
        }
    }
    v4.extend(v6);
    let mut seen = Vec::new();
    v4.retain(|ip| {
        let new = !seen.contains(ip);
        seen.push(*ip);
        new
    });
    v4
}

/// `http://ADDRESS:PORT` (IPv6 in brackets), without a trailing slash.
pub fn origin(ip: IpAddr, port: u16) -> String {
    format!("http://{}", SocketAddr::new(ip, port))
}

/// One address's pages, as the control page's join panel and `/join` show them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct JoinUrls {
    pub address: String,
    /// The control page, `/`.
    pub control: String,
    /// The drum machine, `/drums.html`.
    pub drums: String,
}

impl JoinUrls {
    pub fn new(ip: IpAddr, port: u16) -> JoinUrls {
        let origin = origin(ip, port);
        JoinUrls {
            address: ip.to_string(),
            control: format!("{origin}/"),
            drums: format!("{origin}/drums.html"),
        }
    }
}

impl JoinUrls {
    /// The same pages in `room`: `?room=NAME` on both (nothing for `main`, whose pages need no
    /// query, so that `main`'s panel and QR codes stay as short as they were).
    pub fn in_room(mut self, room: &RoomName) -> JoinUrls {
        if !room.is_main() {
            // A room name is [a-z0-9_-]: safe in a query as it is.
            self.control = format!("{}?room={room}", self.control);
            self.drums = format!("{}?room={room}", self.drums);
        }
        self
    }
}

/// The body of `GET /join` (and `/join?room=NAME`): every LAN URL of the pages.
#[derive(Clone, Debug, Serialize)]
pub struct JoinInfo {
    pub bind: String,
    pub port: u16,
    /// The room the URLs join; absent for `main`, as before rooms existed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub room: Option<String>,
    pub urls: Vec<JoinUrls>,
}

impl JoinInfo {
    pub fn new(bind: IpAddr, port: u16, lan: &[IpAddr]) -> JoinInfo {
        JoinInfo {
            bind: bind.to_string(),
            port,
            room: None,
            urls: lan.iter().map(|ip| JoinUrls::new(*ip, port)).collect(),
        }
    }

    /// The same addresses, with URLs that join `room`.
    pub fn in_room(mut self, room: &RoomName) -> JoinInfo {
        if !room.is_main() {
            self.room = Some(room.to_string());
        }
        self.urls = self.urls.into_iter().map(|u| u.in_room(room)).collect();
        self
    }

    pub fn json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| "{}".into())
    }
}

/// Why a QR code was not made.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum QrError {
    #[error(
        "give the text to encode as ?text=..., e.g. /qr.svg?text=http%3A%2F%2F192.168.1.20%3A3000%2F"
    )]
    Missing,
    #[error("the text is longer than {MAX_QR_TEXT} bytes; QR codes here are for URLs")]
    TooLong,
    #[error("?text= is not valid percent-encoded UTF-8")]
    BadEncoding,
    #[error("cannot encode that text as a QR code: {0}")]
    Encode(String),
}

/// The `text` query parameter of `/qr.svg`, decoded.
pub fn qr_text(query: &str) -> Result<String, QrError> {
    let raw = query
        .split('&')
        .find_map(|pair| pair.strip_prefix("text="))
        .ok_or(QrError::Missing)?;
    // Checked before decoding too, so a huge query costs nothing to refuse.
    if raw.len() > 3 * MAX_QR_TEXT {
        return Err(QrError::TooLong);
    }
    let bytes = crate::www::percent_decode(raw, true).ok_or(QrError::BadEncoding)?;
    let text = String::from_utf8(bytes).map_err(|_| QrError::BadEncoding)?;
    if text.is_empty() {
        return Err(QrError::Missing);
    }
    if text.len() > MAX_QR_TEXT {
        return Err(QrError::TooLong);
    }
    Ok(text)
}

/// `text` as a QR code (error correction M, the standard quiet zone of 4 modules): an SVG
/// whose unit is one module, black on white, to be scaled by whoever shows it.
pub fn qr_svg(text: &str) -> Result<String, QrError> {
    if text.is_empty() {
        return Err(QrError::Missing);
    }
    if text.len() > MAX_QR_TEXT {
        return Err(QrError::TooLong);
    }
    let code = QrCode::with_error_correction_level(text.as_bytes(), EcLevel::M)
        .map_err(|e| QrError::Encode(e.to_string()))?;
    Ok(code
        .render::<svg::Color>()
        .quiet_zone(true)
        .module_dimensions(1, 1)
        .dark_color(svg::Color("#000"))
        .light_color(svg::Color("#fff"))
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(name: &str, ip: &str, usable: bool) -> InterfaceAddress {
        InterfaceAddress {
            interface: name.into(),
            ip: ip.parse().unwrap(),
            usable,
        }
    }

    fn machine() -> Vec<InterfaceAddress> {
        vec![
            iface("lo", "127.0.0.1", false),
            iface("lo", "::1", false),
            iface("eth0", "192.168.1.20", true),
            iface("eth0", "fd00::2", true),
            iface("eth0", "fe80::1", true),
            iface("wlan0", "10.0.0.7", true),
            iface("wlan1", "10.9.9.9", false),
            iface("eth0", "2001:db8::5", true),
        ]
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn all_ipv4_interfaces_give_every_usable_ipv4_address() {
        assert_eq!(
            lan_addresses("0.0.0.0".parse().unwrap(), &machine()),
            ips(&["192.168.1.20", "10.0.0.7"])
        );
    }

    #[test]
    fn all_interfaces_of_both_families_add_routable_ipv6_after_ipv4() {
        assert_eq!(
            lan_addresses("::".parse().unwrap(), &machine()),
            ips(&["192.168.1.20", "10.0.0.7", "fd00::2", "2001:db8::5"])
        );
    }

    #[test]
    fn one_bound_address_is_the_only_one_and_loopback_is_none() {
        assert_eq!(
            lan_addresses("10.0.0.7".parse().unwrap(), &machine()),
            ips(&["10.0.0.7"])
        );
        assert!(lan_addresses("127.0.0.1".parse().unwrap(), &machine()).is_empty());
        assert!(lan_addresses("::1".parse().unwrap(), &machine()).is_empty());
    }

    #[test]
    fn an_address_on_two_interfaces_is_listed_once() {
        let mut m = machine();
        m.push(iface("br0", "192.168.1.20", true));
        assert_eq!(
            lan_addresses("0.0.0.0".parse().unwrap(), &m),
            ips(&["192.168.1.20", "10.0.0.7"])
        );
    }

    #[test]
    fn urls_bracket_ipv6() {
        let u = JoinUrls::new("fd00::2".parse().unwrap(), 3000);
        assert_eq!(u.control, "http://[fd00::2]:3000/");
        assert_eq!(u.drums, "http://[fd00::2]:3000/drums.html");
        let u = JoinUrls::new("192.168.1.20".parse().unwrap(), 80);
        assert_eq!(u.control, "http://192.168.1.20:80/");
        let info = JoinInfo::new("0.0.0.0".parse().unwrap(), 3000, &ips(&["10.0.0.7"]));
        let v: serde_json::Value = serde_json::from_str(&info.json()).unwrap();
        assert_eq!(v["urls"][0]["drums"], "http://10.0.0.7:3000/drums.html");
        assert_eq!(v["port"], 3000);
        assert!(
            v.get("room").is_none(),
            "main's /join is as before rooms: {v}"
        );
    }

    #[test]
    fn urls_in_a_room_carry_it_and_main_stays_bare() {
        let lan = ips(&["10.0.0.7"]);
        let band = RoomName::parse("band-2").unwrap();
        let info = JoinInfo::new("0.0.0.0".parse().unwrap(), 3000, &lan).in_room(&band);
        let v: serde_json::Value = serde_json::from_str(&info.json()).unwrap();
        assert_eq!(v["room"], "band-2");
        assert_eq!(
            v["urls"][0]["drums"],
            "http://10.0.0.7:3000/drums.html?room=band-2"
        );
        assert_eq!(v["urls"][0]["control"], "http://10.0.0.7:3000/?room=band-2");
        let main = JoinInfo::new("0.0.0.0".parse().unwrap(), 3000, &lan).in_room(&RoomName::main());
        let v: serde_json::Value = serde_json::from_str(&main.json()).unwrap();
        assert!(v.get("room").is_none());
        assert_eq!(v["urls"][0]["drums"], "http://10.0.0.7:3000/drums.html");
    }

    #[test]
    fn this_machine_lists_its_own_addresses() {
        let all = interface_addresses().expect("getifaddrs");
        assert!(
            all.iter().any(|a| a.ip.is_loopback() && !a.usable),
            "{all:?}"
        );
    }

    #[test]
    fn qr_text_is_decoded_and_bounded() {
        assert_eq!(
            qr_text("text=http%3A%2F%2F10.0.0.7%3A3000%2F").unwrap(),
            "http://10.0.0.7:3000/"
        );
        assert_eq!(qr_text("a=1&text=hi+there").unwrap(), "hi there");
        assert_eq!(qr_text("").unwrap_err(), QrError::Missing);
        assert_eq!(qr_text("text=").unwrap_err(), QrError::Missing);
        assert_eq!(qr_text("text=%zz").unwrap_err(), QrError::BadEncoding);
        assert_eq!(qr_text("text=%ff").unwrap_err(), QrError::BadEncoding);
        let long = "a".repeat(MAX_QR_TEXT + 1);
        assert_eq!(
            qr_text(&format!("text={long}")).unwrap_err(),
            QrError::TooLong
        );
        let huge = "%41".repeat(10_000);
        assert_eq!(
            qr_text(&format!("text={huge}")).unwrap_err(),
            QrError::TooLong
        );
        assert!(qr_text(&format!("text={}", "a".repeat(MAX_QR_TEXT))).is_ok());
    }

    #[test]
    fn a_qr_code_is_a_square_svg_with_a_quiet_zone() {
        let svg = qr_svg("http://192.168.1.20:3000/drums.html").unwrap();
        assert!(
            svg.contains("<svg xmlns=\"http://www.w3.org/2000/svg\""),
            "{svg}"
        );
        // 36 bytes at level M: version 3, 29 modules, plus 4 quiet modules on each side.
        assert!(svg.contains(r#"width="37" height="37""#), "{svg}");
        assert!(svg.contains(r##"fill="#000""##) && svg.contains(r##"fill="#fff""##));
        // The top row of the two upper finder patterns: seven dark modules each, from the
        // corners of the quiet zone.
        for x in (4..=10).chain(26..=32) {
            assert!(svg.contains(&format!("M{x} 4h1v1H{x}V4")), "{x}: {svg}");
        }
        assert!(!svg.contains("M3 4h1") && !svg.contains("M11 4h1"), "{svg}");
        assert_eq!(qr_svg("").unwrap_err(), QrError::Missing);
        assert_eq!(
            qr_svg(&"x".repeat(MAX_QR_TEXT + 1)).unwrap_err(),
            QrError::TooLong
        );
        // The longest text allowed still encodes.
        assert!(qr_svg(&"x".repeat(MAX_QR_TEXT)).is_ok());
    }
}
