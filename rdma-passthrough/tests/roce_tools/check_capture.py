#!/usr/bin/python3
"""Check a RoCEv2 capture with scapy's RoCE layer (scapy.contrib.roce).

Every UDP datagram to port 4791 must decode as BTH, and its ICRC must be
what scapy computes from the captured IP/UDP headers and payload (a copy
with BTH.icrc = None, rebuilt: its last 4 bytes). Prints one JSON object:
packets, bad, opcodes (name -> count); exit status 1 if any packet is bad.
"""
import json
import sys
import logging

logging.getLogger("scapy.runtime").setLevel(logging.ERROR)
from scapy.all import rdpcap, raw, IP, UDP  # noqa: E402
from scapy.contrib.roce import BTH  # noqa: E402

packets = 0
bad = []
opcodes = {}
for i, p in enumerate(rdpcap(sys.argv[1])):
    if UDP not in p or p[UDP].dport != 4791:
        continue
    packets += 1
    if BTH not in p or IP not in p:
        bad.append((i, "no BTH"))
        continue
    name = p[BTH].get_field("opcode").i2s.get(p[BTH].opcode, hex(p[BTH].opcode))
    opcodes[name] = opcodes.get(name, 0) + 1
    wire = raw(p[IP])[-4:]
    q = p[IP].copy()
    q[BTH].icrc = None
    if raw(q)[-4:] != wire:
        bad.append((i, "icrc %s != %s" % (raw(q)[-4:].hex(), wire.hex())))
print(json.dumps({"packets": packets, "bad": len(bad), "first_bad": bad[:5], "opcodes": opcodes}))
sys.exit(1 if bad else 0)
