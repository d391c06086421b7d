//! Arbitrary bytes through the IPVS generic netlink decoder (`vipd::ipvs::codec`): as a
//! whole netlink message and as a bare generic netlink payload, then every decoder on
//! whatever parsed. Nothing may panic; errors are fine.
//!
//! One property beyond "no panic": an operation decoded from any bytes is one vipd can
//! encode, and decoding that encoding gives an operation that encodes to the same bytes
//! (encode then decode loses nothing of what vipd itself sends).

#![no_main]

use libfuzzer_sys::fuzz_target;
use vipd::core::ipvs::AddrFamily;
use vipd::ipvs::codec::{
    decode_destination, decode_op, decode_service, decode_timeouts, encode_op, genl_bytes, parse_genl,
    parse_nlmsg, IpvsMsg,
};

fn decode_all(msg: &IpvsMsg) {
    let _ = decode_service(msg);
    let _ = decode_destination(msg, AddrFamily::Inet);
    let _ = decode_destination(msg, AddrFamily::Inet6);
    let _ = decode_timeouts(msg);
    if let Ok(op) = decode_op(msg) {
        let encoded = encode_op(&op).unwrap_or_else(|e| panic!("{op:?} decoded but does not encode: {e}"));
        let bytes = genl_bytes(&encoded).expect("an encoded operation serializes");
        let reparsed = parse_genl(&bytes).expect("vipd's own request parses");
        let again = decode_op(&reparsed).unwrap_or_else(|e| panic!("{op:?} encoded does not decode: {e}"));
        let bytes_again = genl_bytes(&encode_op(&again).expect("a re-decoded operation encodes"))
            .expect("an encoded operation serializes");
        assert_eq!(bytes, bytes_again, "{op:?} and {again:?} encode differently");
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = parse_nlmsg(data) {
        decode_all(&msg);
    }
    if let Ok(msg) = parse_genl(data) {
        decode_all(&msg);
    }
});
