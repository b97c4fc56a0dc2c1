"""Generate the Wireshark Lua dissector for the xHCI record interface from the Python
declarations (record layouts, TRB layouts, contexts, registers, names), and install it.

    python -m xhcidbg.trace.dissector [OUT]     # writes captures/xhcidbg.lua by default
    xhcidbg trace install-dissector             # into Wireshark's personal Lua plugin folder

Field names for display filters: xhci.kind, xhci.slot, xhci.dci, xhci.cc, xhci.port, xhci.reg,
xhci.trb.type and xhci.trb.<field> (xhci.trb.<type>.<field> where a field sits elsewhere in
that TRB type), xhci.<record>.<field>, xhci.slot_ctx.*, xhci.ep_ctx.*, xhci.input_ctx.*,
xhci.reg.<register>.<field>.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from xhcidbg.emu import context as ctx
from xhcidbg.emu import regs
from xhcidbg.emu.layout import Field, Layout
from xhcidbg.emu.trb import CC_NAMES, GENERIC, TRB_NAMES, TrbType
from xhcidbg.emu.trb import LAYOUTS as TRB_LAYOUTS

from . import records
from .records import Kind

PROTO = "xhci"
FILENAME = "xhcidbg.lua"
REPO_COPY = Path(__file__).resolve().parents[2] / "captures" / FILENAME

RECORD_KEYS = {Kind.MMIO: "mmio", Kind.DOORBELL: "doorbell", Kind.TRB: "fetch",
               Kind.EVENT: "event", Kind.COMMAND: "command", Kind.PORT: "port",
               Kind.INTERRUPT: "interrupt", Kind.CONTEXT: "context", Kind.STATE: "state",
               Kind.LOG: "log", Kind.URB: "urb", Kind.FAULT: "fault"}
SPEEDS = {1: "Full-speed", 2: "Low-speed", 3: "High-speed", 4: "SuperSpeed", 5: "SuperSpeedPlus"}

# value names shown for fields of these names (Lua value_string tables)
VALUE_TABLES = {
    "type": "TRB_TYPE", "cc": "CC", "kind": "KIND", "ring": "RING", "ep_type": "EP_TYPE",
    "ep_state": "EP_STATE", "slot_state": "SLOT_STATE", "pls": "PLS", "speed": "SPEED",
    "trt": "TRT", "level": "LOG_LEVEL", "reason": "TRB_TYPE",
}
_HEX_WORDS = ("pointer", "address", "value", "old", "new", "offset", "param", "header", "data",
              "dequeue", "route_string", "drop", "add", "name")


def _lua_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _table(name: str, mapping: dict[int, str]) -> str:
    items = ", ".join(f"[{k}]={_lua_str(v)}" for k, v in sorted(mapping.items()))
    return f"local {name} = {{ {items} }}"


def _label(f: Field) -> str:
    return f.doc or f.name.replace("_", " ")


class _Gen:
    def __init__(self):
        self.decls: list[str] = []       # ProtoField declarations
        self.abbrevs: set[str] = set()

    def field(self, abbrev: str, f: Field) -> str:
        if abbrev in self.abbrevs:
            raise ValueError(f"duplicate Wireshark field {abbrev}")
        self.abbrevs.add(abbrev)
        var = "F." + re.sub(r"\W", "_", abbrev[len(PROTO) + 1:])
        vs = VALUE_TABLES.get(f.name, "nil")
        hexa = any(w in f.name.lower() for w in _HEX_WORDS)
        label = _lua_str(_label(f))
        if f.lo + f.width > 32:
            decl = f'ProtoField.uint64("{abbrev}", {label}, base.HEX)'
        elif f.width == 1:
            decl = f'ProtoField.bool("{abbrev}", {label}, 32, nil, 0x{1 << f.lo:08x})'
        else:
            base = "base.HEX" if hexa and vs == "nil" else "base.DEC"
            decl = (f'ProtoField.uint32("{abbrev}", {label}, {base}, {vs}, '
                    f'0x{f.mask << f.lo:08x})')
        self.decls.append(f"{var} = {decl}")
        return var

    def specs(self, var_of: dict[str, str], layout: Layout) -> str:
        """Lua list of {field, dword, lo, width} for a layout."""
        return "{ " + ", ".join(f"{{{var_of[f.name]}, {f.dword}, {f.lo}, {f.width}}}"
                                for f in layout.fields) + " }"


def _geometry(f: Field) -> tuple[int, int, int]:
    return (f.dword, f.lo, f.width)


def _read_by_hand() -> dict[str, Field]:
    """The fields the hand-written Lua reads by position, named <structure>_<field>."""
    event = TRB_LAYOUTS[TrbType.TRANSFER_EVENT]
    at = {"kind": records._HEAD[0], "version": records._HEAD[1],
          # the TRB Type every TRB has, and the Slot ID where every TRB that has one keeps it
          "trb_type": GENERIC["type"], "trb_slot": event["slot"],
          "event_cc": event["cc"], "event_ep": event["ep"], "event_length": event["length"],
          "event_port": TRB_LAYOUTS[TrbType.PORT_STATUS_CHANGE]["port"]}
    for kind, names in ((Kind.MMIO, ("size", "write", "value")),
                        (Kind.DOORBELL, ("db", "target")),
                        (Kind.TRB, ("address", "slot", "dci", "ring")),
                        (Kind.EVENT, ("dropped",)), (Kind.COMMAND, ("cc", "slot")),
                        (Kind.PORT, ("port", "old", "new")), (Kind.INTERRUPT, ("interrupter",)),
                        (Kind.CONTEXT, ("slot", "dci", "reason")), (Kind.LOG, ("level",)),
                        (Kind.URB, ("slot", "dci"))):
        for name in names:
            at[f"{RECORD_KEYS[kind]}_{name}"] = records.LAYOUTS[kind][name]
    return at


def generate() -> str:
    g = _Gen()
    out: list[str] = []
    trb_type_names = dict(TRB_NAMES)

    # ---- record layouts: the header fields are shared, the rest per record kind ----
    head_vars = {f.name: g.field(f"{PROTO}.{f.name}", f) for f in records._HEAD}
    rec_specs = {}
    for kind, layout in records.LAYOUTS.items():
        key = RECORD_KEYS[kind]
        var_of = dict(head_vars)
        for f in layout.fields:
            if f.name not in var_of:
                var_of[f.name] = g.field(f"{PROTO}.{key}.{f.name}", f)
        rec_specs[int(kind)] = g.specs(var_of, layout)

    # ---- TRB layouts: the most common position of a field name gets xhci.trb.<name> ----
    all_trb = {int(t): lay for t, lay in TRB_LAYOUTS.items()}
    seen = Counter((f.name, _geometry(f)) for lay in [*all_trb.values(), GENERIC]
                   for f in lay.fields)
    majority: dict[str, tuple] = {}
    for (name, geo), _n in sorted(seen.items(), key=lambda kv: (-kv[1], kv[0])):
        majority.setdefault(name, geo)
    shared: dict[tuple, str] = {}
    trb_specs = {}
    for t, lay in [*sorted(all_trb.items()), (0, GENERIC)]:
        var_of = {}
        tkey = TrbType(t).name.lower() if t else "generic"
        for f in lay.fields:
            if majority[f.name] == _geometry(f):
                k = (f.name, _geometry(f))
                if k not in shared:
                    shared[k] = g.field(f"{PROTO}.trb.{f.name}", f)
                var_of[f.name] = shared[k]
            else:
                var_of[f.name] = g.field(f"{PROTO}.trb.{tkey}.{f.name}", f)
        trb_specs[t] = g.specs(var_of, lay)

    # ---- contexts ----
    ctx_specs = {}
    for key, lay in (("slot_ctx", ctx.SLOT_CTX), ("ep_ctx", ctx.EP_CTX),
                     ("input_ctx", ctx.INPUT_CTRL_CTX)):
        var_of = {f.name: g.field(f"{PROTO}.{key}.{f.name}", f) for f in lay.fields}
        ctx_specs[key] = g.specs(var_of, lay)

    # ---- registers ----
    reg_specs = {}
    all_regs = [*regs.CAP_REGS, *regs.OP_REGS, *regs.PORT_REGS, regs.MFINDEX, *regs.IR_REGS,
                regs.DOORBELL]
    for r in all_regs:
        var_of = {f.name: g.field(f"{PROTO}.reg.{r.name.lower()}.{f.name}", f)
                  for f in r.layout.fields}
        reg_specs[r.name] = g.specs(var_of, r.layout)

    out.append(f"-- Generated by `python -m xhcidbg.trace.dissector` from xhcidbg's Python "
               f"declarations.\n-- Do not edit: change the declarations and regenerate "
               f"(a test checks this file is current).\n"
               f"-- Decodes the xHCI-level records xhcidbg writes on its pcapng interface with "
               f"link type USER0 ({records.LINKTYPE}).")
    out.append(f'local xhci = Proto("{PROTO}", "xhcidbg xHCI controller record")')
    out.append(f"local RECORD_VERSION = {records.VERSION}")
    out.append(f"local TRB_OFFSET = {records.TRB_OFFSET}")
    out.append(f"local CONTEXT_OFFSET = {records.CONTEXT_OFFSET}")
    out.append(_table("KIND", {int(k): records.LAYOUTS[k].name for k in Kind}))
    out.append(_table("TRB_TYPE", trb_type_names))
    out.append(_table("CC", CC_NAMES))
    out.append(_table("RING", {r.value: r.name.lower() for r in records.Ring}))
    out.append(_table("EP_TYPE", ctx.EP_TYPE_NAMES))
    out.append(_table("EP_STATE", ctx.EP_STATE_NAMES))
    out.append(_table("SLOT_STATE", ctx.SLOT_STATE_NAMES))
    out.append(_table("PLS", regs.PLS_NAMES))
    out.append(_table("SPEED", SPEEDS))
    out.append(_table("TRT", {0: "No Data Stage", 2: "OUT Data Stage", 3: "IN Data Stage"}))
    out.append(_table("LOG_LEVEL", dict(enumerate(records.LOG_LEVELS))))
    out.append("local RECORD_SIZE = { " + ", ".join(f"[{int(k)}]={records.LAYOUTS[k].size}"
                                                     for k in Kind) + " }")
    out.append(f"local TRANSFER_EVENT, PORT_STATUS_CHANGE = {int(TrbType.TRANSFER_EVENT)}, "
               f"{int(TrbType.PORT_STATUS_CHANGE)}")
    out.append(f"local RING_TRANSFER = {int(records.Ring.TRANSFER)}")
    out.append(f"local CTX_SLOT, CTX_INPUT_CONTROL = {records.CTX_SLOT}, "
               f"{records.CTX_INPUT_CONTROL}")
    out.append("-- the fields the code below reads itself: {dword, lo, width}")
    out.append("local AT = {\n" + ",\n".join(f"  {name} = {{{f.dword}, {f.lo}, {f.width}}}"
                                              for name, f in _read_by_hand().items()) + "\n}")
    out.append("")
    out.append("local F = {}     -- every ProtoField, keyed by its abbreviation's tail")
    out.extend(g.decls)
    generic = [
        ("F.G_slot", f'ProtoField.uint8("{PROTO}.slot", "Slot ID")'),
        ("F.G_dci", f'ProtoField.uint8("{PROTO}.dci", "Endpoint (DCI)")'),
        ("F.G_cc", f'ProtoField.uint8("{PROTO}.cc", "Completion code", base.DEC, CC)'),
        ("F.G_port", f'ProtoField.uint8("{PROTO}.port", "Root hub port")'),
        ("F.G_reg", f'ProtoField.string("{PROTO}.reg", "Register")'),
        ("F.G_text", f'ProtoField.string("{PROTO}.text", "Text")'),
    ]
    for var, decl in generic:
        out.append(f"{var} = {decl}")
    out.append("xhci.fields = F")
    out.append("")
    out.append("local RECORD = {\n" + ",\n".join(f"  [{k}] = {v}" for k, v in rec_specs.items())
               + "\n}")
    out.append("local TRB = {\n" + ",\n".join(f"  [{k}] = {v}" for k, v in trb_specs.items())
               + "\n}")
    out.append("local CONTEXT = {\n" + ",\n".join(f"  {k} = {v}" for k, v in ctx_specs.items())
               + "\n}")
    out.append("local REGISTER = {\n" + ",\n".join(f"  [{_lua_str(k)}] = {v}"
                                                    for k, v in reg_specs.items()) + "\n}")
    out.append("local K = { " + ", ".join(f"{k.name}={int(k)}" for k in Kind) + " }")
    out.append(_RUNTIME)
    return "\n".join(out) + "\n"


# The hand-written part: walking the generated tables, the Info column, chaining to usbmon.
_RUNTIME = r'''
local UINT64_ONES = UInt64.new(0xFFFFFFFF, 0xFFFFFFFF)

-- add every field of a layout that starts at byte `base`; returns the values by position
local function add_fields(tree, tvb, base, specs)
  for _, s in ipairs(specs) do
    local pf, dw, lo, width = s[1], s[2], s[3], s[4]
    local off = base + 4 * dw
    if lo + width <= 32 then
      if off + 4 <= tvb:len() then tree:add_le(pf, tvb(off, 4)) end
    elseif off + 8 <= tvb:len() then
      local v = tvb(off, 8):le_uint64():rshift(lo)
      if width < 64 then v = v:band(UINT64_ONES:rshift(64 - width)) end
      tree:add_le(pf, tvb(off, 8), v)
    end
  end
end

-- one field (an AT entry) of the structure at byte `base`: its value, its first byte, its bytes
local function get(tvb, base, at)
  return bit32.extract(tvb(base + 4 * at[1], 4):le_uint(), at[2], at[3])
end
local function byte_of(base, at) return base + 4 * at[1] + math.floor(at[2] / 8) end
local function span(tvb, base, at)
  return tvb(byte_of(base, at), math.ceil((at[2] % 8 + at[3]) / 8))
end
local function hex64(tvb, off) return "0x" .. tvb(off, 8):le_uint64():tohex() end
local function generated(tree, pf, range, value) tree:add(pf, range, value):set_generated() end

-- a TRB at byte `off`: its own subtree, and the generic slot/ep/cc fields
local function add_trb(tree, tvb, off)
  local ttype = get(tvb, off, AT.trb_type)
  local name = TRB_TYPE[ttype] or ("type " .. ttype)
  local st = tree:add(xhci, tvb(off, 16), "TRB: " .. name)
  add_fields(st, tvb, off, TRB[ttype] or TRB[0])
  return st, ttype, name
end

local usbmon = DissectorTable.get("wtap_encap"):get_dissector(wtap_encaps.USB_LINUX_MMAPPED)

function xhci.dissector(tvb, pinfo, tree)
  if tvb:len() < 4 then return 0 end
  pinfo.cols.protocol = "xHCI"
  local kind = get(tvb, 0, AT.kind)
  local version = get(tvb, 0, AT.version)
  local root = tree:add(xhci, tvb(), "xhcidbg " .. (KIND[kind] or "record") .. " record")
  if version ~= RECORD_VERSION or RECORD[kind] == nil then
    root:add_expert_info(PI_MALFORMED, PI_ERROR, "record version " .. version .. " kind " ..
                         kind .. " is not known to this dissector: regenerate it")
    return tvb:len()
  end
  add_fields(root, tvb, 0, RECORD[kind])
  local text_at = RECORD_SIZE[kind]      -- where the variable part starts
  local info
  if kind == K.MMIO then
    local name = tvb(text_at):string()
    local write = get(tvb, 0, AT.mmio_write) == 1
    local value_at = byte_of(0, AT.mmio_value)
    local value = get(tvb, 0, AT.mmio_size) == 8 and hex64(tvb, value_at)
                  or string.format("0x%08x", tvb(value_at, 4):le_uint())
    root:add(F.G_reg, tvb(text_at), name)
    local specs = REGISTER[name:gsub("%[%d+%]$", "")]
    if specs then add_fields(root:add(xhci, tvb(value_at, 4), name), tvb, value_at, specs) end
    if write then info = "MMIO write " .. name .. " = " .. value
    else info = "MMIO read " .. name .. " -> " .. value end
  elseif kind == K.DOORBELL then
    local db, target = get(tvb, 0, AT.doorbell_db), get(tvb, 0, AT.doorbell_target)
    generated(root, F.G_slot, span(tvb, 0, AT.doorbell_db), db)
    if db ~= 0 then generated(root, F.G_dci, span(tvb, 0, AT.doorbell_target), target) end
    info = db == 0 and "Doorbell: command ring" or ("Doorbell: slot " .. db .. " DCI " .. target)
  elseif kind == K.TRB or kind == K.EVENT or kind == K.COMMAND then
    local _, ttype, name = add_trb(root, tvb, TRB_OFFSET)
    if kind == K.TRB then
      local address = hex64(tvb, byte_of(0, AT.fetch_address))
      if get(tvb, 0, AT.fetch_ring) == RING_TRANSFER then
        local slot, dci = get(tvb, 0, AT.fetch_slot), get(tvb, 0, AT.fetch_dci)
        generated(root, F.G_slot, span(tvb, 0, AT.fetch_slot), slot)
        generated(root, F.G_dci, span(tvb, 0, AT.fetch_dci), dci)
        info = "TRB " .. slot .. "/" .. dci .. " @" .. address .. " " .. name
      else
        local slot = get(tvb, TRB_OFFSET, AT.trb_slot)    -- the slot the command is about
        if slot ~= 0 then generated(root, F.G_slot, span(tvb, TRB_OFFSET, AT.trb_slot), slot) end
        info = "TRB cmd @" .. address .. " " .. name
      end
    elseif kind == K.EVENT then
      local slot = get(tvb, TRB_OFFSET, AT.trb_slot)
      local cc = get(tvb, TRB_OFFSET, AT.event_cc)
      if slot ~= 0 then generated(root, F.G_slot, span(tvb, TRB_OFFSET, AT.trb_slot), slot) end
      generated(root, F.G_cc, span(tvb, TRB_OFFSET, AT.event_cc), cc)
      info = "Event " .. name .. ": " .. (CC[cc] or ("cc " .. cc))
      if ttype == TRANSFER_EVENT then
        local ep = get(tvb, TRB_OFFSET, AT.event_ep)
        generated(root, F.G_dci, span(tvb, TRB_OFFSET, AT.event_ep), ep)
        info = info .. " slot " .. slot .. " ep " .. ep .. " residue " ..
               get(tvb, TRB_OFFSET, AT.event_length)
      elseif ttype == PORT_STATUS_CHANGE then
        local port = get(tvb, TRB_OFFSET, AT.event_port)
        generated(root, F.G_port, span(tvb, TRB_OFFSET, AT.event_port), port)
        info = info .. " port " .. port
      elseif slot ~= 0 then
        info = info .. " slot " .. slot
      end
      if get(tvb, 0, AT.event_dropped) == 1 then info = info .. " [DROPPED]" end
    else
      local cc, slot = get(tvb, 0, AT.command_cc), get(tvb, 0, AT.command_slot)
      generated(root, F.G_cc, span(tvb, 0, AT.command_cc), cc)
      if slot ~= 0 then generated(root, F.G_slot, span(tvb, 0, AT.command_slot), slot) end
      info = "Command " .. name .. " -> " .. (CC[cc] or ("cc " .. cc))
      if slot ~= 0 then info = info .. " slot " .. slot end
    end
  elseif kind == K.PORT then
    local port = get(tvb, 0, AT.port_port)
    local old_at, new_at = byte_of(0, AT.port_old), byte_of(0, AT.port_new)
    generated(root, F.G_port, span(tvb, 0, AT.port_port), port)
    add_fields(root:add(xhci, tvb(old_at, 4), "PORTSC before"), tvb, old_at, REGISTER["PORTSC"])
    add_fields(root:add(xhci, tvb(new_at, 4), "PORTSC after"), tvb, new_at, REGISTER["PORTSC"])
    info = string.format("Port %d: PORTSC %08x -> %08x", port, tvb(old_at, 4):le_uint(),
                         tvb(new_at, 4):le_uint())
  elseif kind == K.INTERRUPT then
    info = "Interrupt " .. get(tvb, 0, AT.interrupt_interrupter)
  elseif kind == K.CONTEXT then
    local slot, dci = get(tvb, 0, AT.context_slot), get(tvb, 0, AT.context_dci)
    local reason = get(tvb, 0, AT.context_reason)
    generated(root, F.G_slot, span(tvb, 0, AT.context_slot), slot)
    local what, specs
    if dci == CTX_SLOT then what, specs = "Slot context", CONTEXT.slot_ctx
    elseif dci == CTX_INPUT_CONTROL then what, specs = "Input control context", CONTEXT.input_ctx
    else
      what, specs = "Endpoint context DCI " .. dci, CONTEXT.ep_ctx
      generated(root, F.G_dci, span(tvb, 0, AT.context_dci), dci)
    end
    add_fields(root:add(xhci, tvb(CONTEXT_OFFSET, 32), what), tvb, CONTEXT_OFFSET, specs)
    info = what .. " of slot " .. slot .. " (after " .. (TRB_TYPE[reason] or reason) .. ")"
  elseif kind == K.STATE then
    local text = tvb(text_at):string()
    local parts = {}
    for p in (text .. "\0"):gmatch("([^%z]*)%z") do parts[#parts + 1] = p end
    root:add(F.G_text, tvb(text_at), table.concat(parts, " "))
    info = string.format("State %s %s: %s -> %s", parts[1] or "", parts[2] or "",
                         parts[3] or "", parts[4] or "")
  elseif kind == K.LOG then
    root:add(F.G_text, tvb(text_at))
    info = "[" .. (LOG_LEVEL[get(tvb, 0, AT.log_level)] or "?") .. "] " .. tvb(text_at):string()
  elseif kind == K.FAULT then
    root:add(F.G_text, tvb(text_at))
    info = tvb(text_at):string()
  elseif kind == K.URB then
    local slot = get(tvb, 0, AT.urb_slot)
    if slot ~= 0 then generated(root, F.G_slot, span(tvb, 0, AT.urb_slot), slot) end
    generated(root, F.G_dci, span(tvb, 0, AT.urb_dci), get(tvb, 0, AT.urb_dci))
    -- the rest is a usbmon record: Wireshark's own USB dissector takes it from here
    if usbmon and tvb:len() > text_at then usbmon:call(tvb(text_at):tvb(), pinfo, tree) end
    return tvb:len()
  end
  pinfo.cols.info = info or (KIND[kind] or "record")
  return tvb:len()
end

DissectorTable.get("wtap_encap"):add(wtap_encaps.USER0, xhci)
'''


def write(path: Path = REPO_COPY) -> Path:
    path.write_text(generate())
    return path


def plugin_folder() -> Path:
    """Wireshark's personal Lua plugin folder, as tshark reports it (or its usual place)."""
    tshark = shutil.which("tshark")
    if tshark:
        try:
            out = subprocess.run([tshark, "-G", "folders"], capture_output=True, text=True,
                                 timeout=30).stdout
            for line in out.splitlines():
                if line.startswith("Personal Lua Plugins:"):
                    return Path(line.split(":", 1)[1].strip())
        except (OSError, subprocess.SubprocessError):
            pass
    base = os.environ.get("XDG_CONFIG_HOME") and Path(os.environ["XDG_CONFIG_HOME"]).parent
    return Path(base or Path.home() / ".local") / "lib" / "wireshark" / "plugins"


def install(folder: Path | None = None) -> Path:
    folder = folder or plugin_folder()
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / FILENAME
    dest.write_text(generate())
    return dest


if __name__ == "__main__":
    print(write(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO_COPY))
