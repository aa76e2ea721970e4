-- Wireshark dissector for QEMU's live-migration stream and its return path, made by qmig
-- (`qmig export-pcap --lua FILE`) from the wire profile named below. GPL-2.0-or-later.
--
-- Load it with `wireshark -X lua_script:FILE` / `tshark -X lua_script:FILE`, or copy it to
-- ~/.local/lib/wireshark/plugins/. It dissects TCP on the port set in its preference
-- (Protocols > QMIG, default 4444) and any TCP stream that starts with the QEVM magic or
-- multifd's handshake.
--
-- A migration's channels all connect to the destination's one port; as QEMU's destination
-- does, each TCP stream is told by its first bytes: the QEVM magic opens the main channel,
-- a command opens a main channel resumed after a postcopy pause, multifd's magic opens a
-- multifd channel, and anything else to the port is the postcopy-preempt channel (bare RAM
-- records, no header: known only by its port, so set the preference to the migration's).
-- On the main channel the source -> destination direction is the migration stream; the
-- reverse direction is the return path. Records are delimited as qmig's reader does: lengths where the format has them,
-- the RAM section's record flags, PACKAGED's length, and for device sections (which carry no
-- length) their footer followed by something that can only start the next record.

--@@PROFILE@@

local MAX_DEVICE = 16 * 1024 * 1024  -- give up delimiting a device section after this many bytes
local PAGE = 2 ^ PROFILE.target_page_bits

local qmig = Proto("qmig", "QEMU migration stream (QEMU " .. PROFILE.name .. " profile)")

local function invert(t)
  local out = {}
  for name, number in pairs(t) do out[number] = name end
  return out
end

local function names(t)
  local out = {}
  for number, spec in pairs(t) do out[number] = spec.name end
  return out
end

local ST = PROFILE.section_types
local SECTION_NAMES = invert(ST)
local COMMAND_NAMES = names(PROFILE.commands)
local RP_NAMES = names(PROFILE.rp_messages)
local FLAGS = PROFILE.ram_flags

local f = {
  record = ProtoField.string("qmig.record", "Record"),
  offset = ProtoField.uint64("qmig.offset", "Stream offset"),
  depth = ProtoField.uint8("qmig.depth", "PACKAGED depth"),
  magic = ProtoField.uint32("qmig.magic", "Magic", base.HEX),
  version = ProtoField.uint32("qmig.version", "Stream version"),
  section_type = ProtoField.uint8("qmig.section_type", "Section type", base.HEX, SECTION_NAMES),
  machine_type = ProtoField.string("qmig.machine_type", "Machine type"),
  subsection = ProtoField.string("qmig.subsection", "Subsection"),
  subsection_version = ProtoField.uint32("qmig.subsection_version", "Subsection version"),
  target_page_bits = ProtoField.uint32("qmig.target_page_bits", "Target page bits"),
  capability = ProtoField.string("qmig.capability", "Capability"),
  uuid = ProtoField.bytes("qmig.uuid", "UUID"),
  section_id = ProtoField.uint32("qmig.section_id", "Section id"),
  idstr = ProtoField.string("qmig.idstr", "Section idstr"),
  instance_id = ProtoField.uint32("qmig.instance_id", "Instance id"),
  version_id = ProtoField.uint32("qmig.version_id", "Version id"),
  cmd = ProtoField.uint16("qmig.cmd", "Command", base.DEC, COMMAND_NAMES),
  cmd_len = ProtoField.uint16("qmig.cmd_len", "Command length"),
  ping = ProtoField.uint32("qmig.ping", "PING value", base.HEX),
  advise_summary = ProtoField.uint64("qmig.advise.page_size_summary", "Page size summary", base.HEX),
  advise_target = ProtoField.uint64("qmig.advise.target_page_size", "Target page size"),
  discard_version = ProtoField.uint8("qmig.discard.version", "Discard version"),
  discard_block = ProtoField.string("qmig.discard.block", "Discard RAMBlock"),
  discard_start = ProtoField.uint64("qmig.discard.start", "Range start", base.HEX),
  discard_length = ProtoField.uint64("qmig.discard.length", "Range length", base.HEX),
  packaged_length = ProtoField.uint32("qmig.packaged.length", "Package length"),
  bitmap_block = ProtoField.string("qmig.recv_bitmap.block", "RECV_BITMAP RAMBlock"),
  payload = ProtoField.bytes("qmig.payload", "Payload"),
  ram_header = ProtoField.uint64("qmig.ram.header", "Offset | flags", base.HEX),
  ram_offset = ProtoField.uint64("qmig.ram.offset", "RAM offset", base.HEX),
  ram_flags = ProtoField.uint16("qmig.ram.flags", "RAM flags", base.HEX),
  ram_kind = ProtoField.string("qmig.ram.kind", "RAM record"),
  ram_block = ProtoField.string("qmig.ram.block", "RAMBlock"),
  ram_data = ProtoField.bytes("qmig.ram.data", "Page data"),
  ram_fill = ProtoField.uint8("qmig.ram.fill", "Fill byte", base.HEX),
  ram_body_length = ProtoField.uint32("qmig.ram.body_length", "Encoded length"),
  mem_total = ProtoField.uint64("qmig.mem_size.total", "Total RAM", base.HEX),
  mem_block = ProtoField.string("qmig.mem_size.block", "RAMBlock"),
  mem_used = ProtoField.uint64("qmig.mem_size.used_length", "Used length", base.HEX),
  mem_page_size = ProtoField.uint64("qmig.mem_size.page_size", "Page size", base.HEX),
  mem_mr_addr = ProtoField.uint64("qmig.mem_size.mr_addr", "Region address", base.HEX),
  device_data = ProtoField.bytes("qmig.device.data", "Device state"),
  vmdesc = ProtoField.string("qmig.vmdescription", "VMDESCRIPTION JSON"),
  undecoded = ProtoField.bytes("qmig.undecoded", "Undecoded"),
  rp_message = ProtoField.string("qmig.rp.message", "Return-path message"),
  rp_type = ProtoField.uint16("qmig.rp.type", "Message type", base.DEC, RP_NAMES),
  rp_len = ProtoField.uint16("qmig.rp.len", "Message length"),
  rp_status = ProtoField.uint32("qmig.rp.status", "SHUT status"),
  rp_value = ProtoField.uint32("qmig.rp.value", "Value", base.HEX),
  rp_start = ProtoField.uint64("qmig.rp.start", "Start", base.HEX),
  rp_length = ProtoField.uint32("qmig.rp.length", "Length", base.HEX),
  rp_block = ProtoField.string("qmig.rp.block", "RAMBlock"),
  rp_bitmap_size = ProtoField.uint64("qmig.rp.bitmap_size", "Bitmap size"),
  rp_bitmap = ProtoField.bytes("qmig.rp.bitmap", "Bitmap"),
  channel = ProtoField.string("qmig.channel", "Channel"),
  mf_magic = ProtoField.uint32("qmig.multifd.magic", "Magic", base.HEX),
  mf_version = ProtoField.uint32("qmig.multifd.version", "Version"),
  mf_uuid = ProtoField.bytes("qmig.multifd.uuid", "Migration UUID"),
  mf_channel = ProtoField.uint8("qmig.multifd.channel", "Channel id"),
  mf_flags = ProtoField.uint32("qmig.multifd.flags", "Flags", base.HEX),
  mf_sync = ProtoField.bool("qmig.multifd.sync", "SYNC"),
  mf_compression = ProtoField.string("qmig.multifd.compression", "Compression"),
  mf_pages_alloc = ProtoField.uint32("qmig.multifd.pages_alloc", "Pages allocated"),
  mf_normal_pages = ProtoField.uint32("qmig.multifd.normal_pages", "Normal pages"),
  mf_zero_pages = ProtoField.uint32("qmig.multifd.zero_pages", "Zero pages"),
  mf_next_packet_size = ProtoField.uint32("qmig.multifd.next_packet_size", "Payload size"),
  mf_packet_num = ProtoField.uint64("qmig.multifd.packet_num", "Packet number"),
  mf_ramblock = ProtoField.string("qmig.multifd.ramblock", "RAMBlock"),
  mf_page = ProtoField.uint64("qmig.multifd.page", "Normal page offset", base.HEX),
  mf_zero = ProtoField.uint64("qmig.multifd.zero_page", "Zero page offset", base.HEX),
  mf_data = ProtoField.bytes("qmig.multifd.data", "Page data"),
  mf_idstr = ProtoField.string("qmig.multifd.idstr", "Device idstr"),
  mf_instance_id = ProtoField.uint32("qmig.multifd.instance_id", "Instance id"),
  mf_state = ProtoField.bytes("qmig.multifd.state", "Device state"),
}
local field_list = {}
for _, field in pairs(f) do field_list[#field_list + 1] = field end
qmig.fields = field_list

local e_malformed = ProtoExpert.new("qmig.malformed", "Malformed migration data",
  expert.group.MALFORMED, expert.severity.ERROR)
local e_undelimited = ProtoExpert.new("qmig.undelimited", "Cannot delimit the rest of the stream",
  expert.group.UNDECODED, expert.severity.WARN)
qmig.experts = { e_malformed, e_undelimited }

qmig.prefs.port = Pref.uint("TCP port", 4444, "Destination TCP port of migrations")

-- --- small readers ----------------------------------------------------------------------

local function u8(tvb, o) return tvb(o, 1):uint() end
local function u16(tvb, o) return tvb(o, 2):uint() end
local function u32(tvb, o) return tvb(o, 4):uint() end
-- A be64 as a Lua number: exact below 2^53, which every length and offset here is.
local function u64(tvb, o) return tvb(o, 4):uint() * 4294967296 + tvb(o + 4, 4):uint() end
local function has(value, flag) return math.floor(value / flag) % 2 == 1 end

local function allows(spec, length)
  if spec.lengths then
    for _, n in ipairs(spec.lengths) do if n == length then return true end end
    return false
  end
  return length >= (spec.min or 0)
end

local function copy(value)
  if type(value) ~= "table" then return value end
  local out = {}
  for k, v in pairs(value) do out[k] = copy(v) end
  return out
end

-- Parsers return "ok", bytes used | "more", bytes still missing (-1: unknown) | "bad", why.
-- Nothing is added to the tree, nor to the state, before a record is known to be complete.

local Reader = {}
Reader.__index = Reader

local function new_state()
  return { mode = "header", pos = 0, sections = {}, blocks = {}, block = nil,
           advise_sizes = nil, caps = {}, section = nil }
end

-- r: { tvb, limit, bounded (the end is the package's), st, tree, depth, base }
local function reader(tvb, limit, bounded, st, tree, depth, base)
  return setmetatable({ tvb = tvb, limit = limit, bounded = bounded, st = st, tree = tree,
                        depth = depth, base = base }, Reader)
end

-- `final`: `size` covers the whole record. Only then is the missing count exact; for a prefix
-- (a header that says how long the rest is) one more segment is asked for instead, because
-- TCP cannot extend a reassembly a second time within the frame that completed the first.
function Reader:need(o, size, final)
  if o + size <= self.limit then return nil end
  if self.bounded then return "bad", "runs past the end of the package" end
  return "more", final and o + size - self.limit or -1
end

function Reader:item(o, size, name, text)
  local names = self.names
  if names then
    if names[#names] == name and name == "RAM" then
      names.ram = (names.ram or 1) + 1
    else
      if names.ram then names[#names] = "RAM x" .. names.ram; names.ram = nil end
      names[#names + 1] = name
    end
  end
  local item = self.tree:add(f.record, self.tvb(o, size), name)
  item:set_text(text or name)
  item:add(f.offset, self.tvb(o, size), UInt64(self.base + o))
  if self.depth > 0 then item:add(f.depth, self.tvb(o, size), self.depth) end
  return item
end

-- --- header and configuration ------------------------------------------------------------

function Reader:header(o)
  local s, v = self:need(o, 8, true)
  if s then return s, v end
  local tvb = self.tvb
  if u32(tvb, o) ~= PROFILE.magic then return "bad", "not a migration stream (no QEVM magic)" end
  local version = u32(tvb, o + 4)
  local item = self:item(o, 8, "HEADER", "Header, version " .. version)
  item:add(f.magic, tvb(o, 4))
  item:add(f.version, tvb(o + 4, 4))
  if version ~= PROFILE.stream_version then
    item:add_proto_expert_info(e_malformed, "unsupported migration stream version " .. version)
  end
  self.st.mode = "configuration"
  return "ok", 8
end

-- The configuration's size, or "more"/"bad": the subsection list ends at the first byte that
-- is not SUBSECTION, so that byte must be here too.
function Reader:configuration_size(o)
  local tvb = self.tvb
  local s, v = self:need(o, 5)
  if s then return s, v end
  local at = o + 5 + u32(tvb, o + 1)
  while true do
    if at >= self.limit then
      if self.bounded or self.revisit then return "ok", at - o end
      return "more", -1
    end
    if u8(tvb, at) ~= ST.SUBSECTION then return "ok", at - o end
    s, v = self:need(at, 2)
    if s then return s, v end
    local name_end = at + 2 + u8(tvb, at + 1)
    s, v = self:need(name_end, 4)
    if s then return s, v end
    local name = tvb(at + 2, name_end - at - 2):string():gsub("^configuration/", "")
    local body = at + 2 + (name_end - at - 2) + 4
    if name == "target-page-bits" then
      at = body + 4
    elseif name == "uuid" then
      at = body + 16
    elseif name == "capabilities" then
      s, v = self:need(body, 4)
      if s then return s, v end
      local count = u32(tvb, body)
      at = body + 4
      for _ = 1, count do
        s, v = self:need(at, 1)
        if s then return s, v end
        at = at + 1 + u8(tvb, at)
      end
    else
      return "bad", "CONFIGURATION: unknown subsection " .. name
    end
    s, v = self:need(at, 0)
    if s then return s, v end
  end
end

function Reader:configuration(o)
  local tvb = self.tvb
  if u8(tvb, o) ~= ST.CONFIGURATION then
    if PROFILE.configuration_required then return "bad", "configuration section missing" end
    self.st.mode = "top"
    return "ok", 0
  end
  local s, size = self:configuration_size(o)
  if s ~= "ok" then return s, size end
  local length = u32(tvb, o + 1)
  local machine = tvb(o + 5, length):string()
  local item = self:item(o, size, "CONFIGURATION", "Configuration, machine " .. machine)
  item:add(f.machine_type, tvb(o + 5, length))
  local at = o + 5 + length
  while at < o + size do
    local name_length = u8(tvb, at + 1)
    local name = tvb(at + 2, name_length):string()
    local short = name:gsub("^configuration/", "")
    local body = at + 2 + name_length + 4
    local sub = item:add(f.subsection, tvb(at + 2, name_length))
    sub:add(f.subsection_version, tvb(body - 4, 4))
    if short == "target-page-bits" then
      sub:add(f.target_page_bits, tvb(body, 4))
      self.st.page_bits = u32(tvb, body)
      at = body + 4
    elseif short == "uuid" then
      sub:add(f.uuid, tvb(body, 16))
      at = body + 16
    else
      local count = u32(tvb, body)
      at = body + 4
      for _ = 1, count do
        local n = u8(tvb, at)
        sub:add(f.capability, tvb(at + 1, n))
        self.st.caps[tvb(at + 1, n):string()] = true
        at = at + 1 + n
      end
    end
  end
  self.st.mode = "top"
  return "ok", size
end

-- --- sections --------------------------------------------------------------------------

function Reader:enter_section(section)
  self.st.section = section
  self.st.mode = section.idstr == "ram" and "ram" or "device"
end

function Reader:section_full(o, name)
  local tvb = self.tvb
  local s, v = self:need(o, 6)
  if s then return s, v end
  local n = u8(tvb, o + 5)
  s, v = self:need(o, 6 + n + 8, true)
  if s then return s, v end
  if n == 0 then return "bad", name .. ": empty idstr" end
  local id = u32(tvb, o + 1)
  local section = { id = id, idstr = tvb(o + 6, n):string(), instance = u32(tvb, o + 6 + n),
                    version = u32(tvb, o + 10 + n) }
  local item = self:item(o, 14 + n, name, string.format("%s %d %q instance %d version %d", name,
    id, section.idstr, section.instance, section.version))
  item:add(f.section_type, tvb(o, 1))
  item:add(f.section_id, tvb(o + 1, 4))
  item:add(f.idstr, tvb(o + 6, n))
  item:add(f.instance_id, tvb(o + 6 + n, 4))
  item:add(f.version_id, tvb(o + 10 + n, 4))
  self.st.sections[id] = section
  self:enter_section(section)
  return "ok", 14 + n
end

function Reader:section_short(o, name)
  local tvb = self.tvb
  local s, v = self:need(o, 5, true)
  if s then return s, v end
  local id = u32(tvb, o + 1)
  local section = self.st.sections[id]
  if not section then return "bad", name .. ": unknown savevm section " .. id end
  local item = self:item(o, 5, name, string.format("%s %d (%s)", name, id, section.idstr))
  item:add(f.section_type, tvb(o, 1))
  item:add(f.section_id, tvb(o + 1, 4))
  self:enter_section(section)
  return "ok", 5
end

function Reader:after_section()
  self.st.mode = PROFILE.section_footer and "footer" or "top"
end

function Reader:footer(o)
  local s, v = self:need(o, 5, true)
  if s then return s, v end
  local tvb = self.tvb
  local section = self.st.section
  if u8(tvb, o) ~= ST.SECTION_FOOTER then return "bad", "missing section footer" end
  if u32(tvb, o + 1) ~= section.id then
    return "bad", "mismatched section id in footer for " .. section.idstr
  end
  local item = self:item(o, 5, "SECTION_FOOTER", "SECTION_FOOTER " .. section.id)
  item:add(f.section_id, tvb(o + 1, 4))
  self.st.mode = "top"
  return "ok", 5
end

-- --- commands --------------------------------------------------------------------------

local COMMAND_BODY = {}

function COMMAND_BODY.PING(r, item, o, length)
  local value = u32(r.tvb, o)
  item:add(f.ping, r.tvb(o, 4))
  return " " .. value
end

function COMMAND_BODY.POSTCOPY_ADVISE(r, item, o, length)
  if length == 16 then
    item:add(f.advise_summary, r.tvb(o, 8))
    item:add(f.advise_target, r.tvb(o + 8, 8))
    r.st.advise_sizes = { summary = u64(r.tvb, o), target = u64(r.tvb, o + 8) }
    return string.format(" page sizes 0x%x, target %d", u64(r.tvb, o), u64(r.tvb, o + 8))
  end
  r.st.advise_sizes = nil
  return " (no RAM postcopy)"
end

function COMMAND_BODY.POSTCOPY_RAM_DISCARD(r, item, o, length)
  local tvb = r.tvb
  item:add(f.discard_version, tvb(o, 1))
  local n = u8(tvb, o + 1)
  if length < 3 + n or (length - 3 - n) % 16 ~= 0 then
    return nil, "invalid length " .. length .. " for block name of " .. n .. " bytes"
  end
  local block = tvb(o + 2, n):string()
  item:add(f.discard_block, tvb(o + 2, n))
  local count = (length - 3 - n) / 16
  local at = o + 3 + n
  for _ = 1, count do
    local range = item:add(tvb(at, 16), string.format("Range 0x%x + 0x%x", u64(tvb, at),
      u64(tvb, at + 8)))
    range:add(f.discard_start, tvb(at, 8))
    range:add(f.discard_length, tvb(at + 8, 8))
    at = at + 16
  end
  return string.format(" %s, %d range%s", block, count, count == 1 and "" or "s")
end

function COMMAND_BODY.RECV_BITMAP(r, item, o, length)
  local n = u8(r.tvb, o)
  if 1 + n > length then return nil, "block name runs past the command" end
  item:add(f.bitmap_block, r.tvb(o + 1, n))
  return " " .. r.tvb(o + 1, n):string()
end

function Reader:command(o)
  local tvb = self.tvb
  local s, v = self:need(o, 5)
  if s then return s, v end
  local number, length = u16(tvb, o + 1), u16(tvb, o + 3)
  local spec = PROFILE.commands[number]
  if not spec then return "bad", string.format("unknown command: MIG_CMD 0x%x (len 0x%x)", number, length) end
  local name = spec.name
  if not allows(spec, length) then
    return "bad", name .. ": received with bad length " .. length
  end
  s, v = self:need(o, 5 + length, PROFILE.commands[number].name ~= "PACKAGED")
  if s then return s, v end
  local size = 5 + length
  local package_length
  if name == "PACKAGED" then
    package_length = u32(tvb, o + 5)
    if package_length > PROFILE.packaged_max then
      return "bad", "PACKAGED: unreasonably large packaged state: " .. package_length
    end
    s, v = self:need(o, size + package_length, true)
    if s then return s, v end
  end
  local item = self:item(o, size + (package_length or 0), name)
  item:add(f.cmd, tvb(o + 1, 2))
  item:add(f.cmd_len, tvb(o + 3, 2))
  local text = ""
  local decode = COMMAND_BODY[name]
  if package_length then
    item:add(f.packaged_length, tvb(o + 5, 4))
    text = " " .. package_length .. " bytes"
  elseif decode then
    local summary, why = decode(self, item, o + 5, length)
    if not summary then return "bad", name .. ": " .. why end
    text = summary
  elseif length > 0 then
    item:add(f.payload, tvb(o + 5, length))
  end
  item:set_text(name .. text)
  if package_length then
    -- The package is a stream of its own, bounded by its length.
    local inner = reader(tvb, o + size + package_length, true,
      { mode = "top", pos = 0, sections = self.st.sections, blocks = self.st.blocks,
        caps = self.st.caps, advise_sizes = self.st.advise_sizes, page_bits = self.st.page_bits },
      item, self.depth + 1, self.base)
    inner:run(o + size)
    self.st.block = inner.st.block
  end
  return "ok", size + (package_length or 0)
end

-- --- the RAM section -------------------------------------------------------------------

function Reader:page_size()
  return self.st.page_bits and 2 ^ self.st.page_bits or PAGE
end

-- Which MEM_SIZE entries carry a page size: only after a 16-byte ADVISE whose summary differs
-- from the target page size; then a be64 that is a power of two the summary announced.
function Reader:mem_size_entries(o, total)
  local tvb = self.tvb
  local advise = self.st.advise_sizes
  local sizes = advise and advise.summary ~= self:page_size()
  local mr_addr = PROFILE.mem_size_mr_addr == "x-ignore-shared" and self.st.caps["x-ignore-shared"]
  local entries, at, remaining = {}, o + 8, total
  while remaining > 0 do
    local s, v = self:need(at, 1)
    if s then return s, v end
    local n = u8(tvb, at)
    if n == 0 then return "bad", "MEM_SIZE: empty RAMBlock name" end
    s, v = self:need(at, 1 + n + 8)
    if s then return s, v end
    local used = u64(tvb, at + 1 + n)
    if used > remaining then return "bad", "MEM_SIZE: block length exceeds the remaining total" end
    local entry = { at = at, n = n, used = used }
    at = at + 1 + n + 8
    if sizes then
      s, v = self:need(at, 8)
      if s then return s, v end
      local size = u64(tvb, at)
      local summary = advise.summary
      if size ~= self:page_size() and size > 0 and math.floor(summary / size) % 2 == 1 then
        entry.page_size = at
        at = at + 8
      end
    end
    if mr_addr then
      s, v = self:need(at, 8)
      if s then return s, v end
      entry.mr_addr = at
      at = at + 8
    end
    remaining = remaining - used
    entries[#entries + 1] = entry
  end
  return "ok", at - o, entries
end

function Reader:ram(o)
  local tvb = self.tvb
  local s, v = self:need(o, 8)
  if s then return s, v end
  local high, low = u32(tvb, o), u32(tvb, o + 4)
  local page = self:page_size()
  local flags = low % page
  local continue = has(flags, FLAGS.CONTINUE)
  local kind = continue and flags - FLAGS.CONTINUE or flags
  local offset = UInt64.new(low - flags, high)
  local header_value = high * 4294967296 + (low - flags)

  local function simple(name)
    local item = self:item(o, 8, name)
    item:add(f.ram_header, tvb(o, 8))
    item:add(f.ram_flags, tvb(o + 6, 2), flags)
    return item
  end

  if kind == FLAGS.MEM_SIZE and not continue then
    local status, size, entries = self:mem_size_entries(o, header_value)
    if status ~= "ok" then return status, size end
    local item = self:item(o, size, "MEM_SIZE", string.format("MEM_SIZE 0x%x, %d block%s",
      header_value, #entries, #entries == 1 and "" or "s"))
    item:add(f.ram_header, tvb(o, 8))
    item:add(f.mem_total, tvb(o, 8), offset)
    for _, e in ipairs(entries) do
      local name = tvb(e.at + 1, e.n):string()
      local b = item:add(f.mem_block, tvb(e.at + 1, e.n))
      b:add(f.mem_used, tvb(e.at + 1 + e.n, 8))
      if e.page_size then b:add(f.mem_page_size, tvb(e.page_size, 8)) end
      if e.mr_addr then b:add(f.mem_mr_addr, tvb(e.mr_addr, 8)) end
      self.st.blocks[name] = e.used
    end
    return "ok", size
  end
  if kind == FLAGS.EOS and not continue then
    simple("EOS")
    -- The preempt channel is RAM records only: its EOS ends no section.
    if not self.st.preempt then self:after_section() end
    return "ok", 8
  end
  if FLAGS.MULTIFD_FLUSH and kind == FLAGS.MULTIFD_FLUSH and not continue then
    simple("MULTIFD_FLUSH")
    return "ok", 8
  end
  if kind == FLAGS.HOOK then
    simple("HOOK")
    return "ok", 8
  end
  local body_kind
  if kind == FLAGS.ZERO then body_kind = "ZERO"
  elseif kind == FLAGS.PAGE then body_kind = "PAGE"
  elseif kind == FLAGS.XBZRLE then body_kind = "XBZRLE"
  elseif FLAGS.COMPRESS_PAGE and kind == FLAGS.COMPRESS_PAGE then body_kind = "COMPRESS_PAGE"
  else
    return "bad", string.format("RAM: unknown combination of migration flags 0x%x", flags)
  end
  local at = o + 8
  local name_at, name_length
  if not continue then
    s, v = self:need(at, 1)
    if s then return s, v end
    name_length = u8(tvb, at)
    name_at = at + 1
    at = at + 1 + name_length
  elseif not self.st.block then
    return "bad", "RAM: CONTINUE with no previous block"
  end
  local body_length
  if body_kind == "ZERO" then
    body_length = 1
  elseif body_kind == "PAGE" then
    body_length = page
  elseif body_kind == "XBZRLE" then
    s, v = self:need(at, 3)
    if s then return s, v end
    body_length = 3 + u16(tvb, at + 1)
  else
    s, v = self:need(at, 4)
    if s then return s, v end
    body_length = 4 + u32(tvb, at)
  end
  s, v = self:need(at, body_length, true)
  if s then return s, v end
  local block = name_at and tvb(name_at, name_length):string() or self.st.block
  self.st.block = block
  local size = at + body_length - o
  local item = self:item(o, size, "RAM", string.format("RAM %s %s 0x%x%s", body_kind, block,
    header_value, continue and "" or " (names its block)"))
  item:add(f.ram_header, tvb(o, 8))
  item:add(f.ram_offset, tvb(o, 8), offset)
  item:add(f.ram_flags, tvb(o + 6, 2), flags)
  item:add(f.ram_kind, tvb(o, 8), body_kind)
  if name_at then item:add(f.ram_block, tvb(name_at, name_length)) end
  if body_kind == "ZERO" then
    item:add(f.ram_fill, tvb(at, 1))
  elseif body_kind == "PAGE" then
    item:add(f.ram_data, tvb(at, page))
  elseif body_kind == "XBZRLE" then
    item:add(f.ram_body_length, tvb(at + 1, 2))
    item:add(f.ram_data, tvb(at + 3, body_length - 3))
  else
    item:add(f.ram_body_length, tvb(at, 4))
    item:add(f.ram_data, tvb(at + 4, body_length - 4))
  end
  return "ok", size
end

-- --- device sections -------------------------------------------------------------------

-- Can a record start at `at`? true / false, or nil when the bytes to tell are not here yet.
function Reader:starts_record(at)
  local tvb, limit = self.tvb, self.limit
  if at == limit then
    -- On a second pass TCP ends the tvb where the first pass's records ended: the next
    -- record was seen then.
    if self.bounded or self.revisit then return true end
    return nil
  end
  local kind = u8(tvb, at)
  local function here(size)
    if at + size <= limit then return true end
    if self.bounded then return false end
    if self.revisit then return "seen" end
    return nil
  end
  if kind == ST.COMMAND then
    local ok = here(5)
    if ok ~= true then return ok and true end
    local spec = PROFILE.commands[u16(tvb, at + 1)]
    if not spec or not allows(spec, u16(tvb, at + 3)) then return false end
    if self.bounded then return at + 5 + u16(tvb, at + 3) <= limit end
    return true
  end
  if kind == ST.SECTION_FULL or kind == ST.SECTION_START then
    local ok = here(6)
    if ok ~= true then return ok and true end
    local n = u8(tvb, at + 5)
    if n == 0 then return false end
    ok = here(6 + n + 8)
    if ok ~= true then return ok and true end
    local idstr = tvb(at + 6, n):raw()
    return not idstr:find("[^\33-\126]")
  end
  if kind == ST.SECTION_PART or kind == ST.SECTION_END then
    local ok = here(5)
    if ok ~= true then return ok and true end
    local section = self.st.sections[u32(tvb, at + 1)]
    return section ~= nil and section.idstr == "ram"
  end
  if kind == ST.EOF then
    if self.bounded then return at + 1 == limit end
    local ok = here(2)
    if ok ~= true then return ok and true end
    return u8(tvb, at + 1) == ST.VMDESCRIPTION
  end
  return false
end

function Reader:device(o)
  local section = self.st.section
  local tvb = self.tvb
  local footer = string.char(ST.SECTION_FOOTER) .. string.char(
    math.floor(section.id / 16777216) % 256, math.floor(section.id / 65536) % 256,
    math.floor(section.id / 256) % 256, section.id % 256)
  local available = self.limit - o
  local window = math.min(available, MAX_DEVICE)
  local bytes = tvb(o, window):raw()
  local from = 1
  while true do
    local found = bytes:find(footer, from, true)
    if not found then
      if self.bounded or available >= MAX_DEVICE then
        return "bad", "cannot delimit device section " .. section.idstr .. ": no footer found"
      end
      return "more", -1
    end
    local size = found - 1
    if size + 5 > window then return "more", -1 end
    local next_ok = self:starts_record(o + size + 5)
    if next_ok == nil then return "more", -1 end
    if next_ok then
      local item = self:item(o, size, "DEVICE_STATE", string.format(
        "DEVICE_STATE %s instance %d, %d bytes", section.idstr, section.instance, size))
      item:add(f.idstr, tvb(o, size), section.idstr)
      if size > 0 then item:add(f.device_data, tvb(o, size)) end
      self:after_section()
      return "ok", size
    end
    from = found + 1
  end
end

-- --- multifd channels ------------------------------------------------------------------
-- The MultiFDInit_t handshake, then packets: a header (magic, version, flags), then for RAM a
-- fixed part, an array of room for a full packet's page offsets and the payload; for a
-- device-state packet (10.0) its idstr, instance id and size, then the state.

local MF = PROFILE.multifd

-- The bits of `value` that `mask` has (no bit operators: Lua 5.1 to 5.4 alike).
local function masked(value, mask)
  local out, b = 0, 1
  while b <= mask do
    if has(mask, b) and has(value, b) then out = out + b end
    b = b * 2
  end
  return out
end

-- The length of a NUL-padded name of `size` bytes (QEMU reads up to the first NUL).
local function name_length(tvb, o, size)
  local n = 0
  while n < size - 1 and u8(tvb, o + n) ~= 0 do n = n + 1 end
  return n
end

function Reader:multifd_hdr(o, what)
  local tvb = self.tvb
  if u32(tvb, o) ~= MF.magic then
    return string.format("%s: magic 0x%x is not 0x%x", what, u32(tvb, o), MF.magic)
  end
  if u32(tvb, o + 4) ~= MF.version then
    return string.format("%s: version %d is not %d", what, u32(tvb, o + 4), MF.version)
  end
  return nil
end

function Reader:multifd_init(o)
  local s, v = self:need(o, MF.init_size, true)
  if s then return s, v end
  local why = self:multifd_hdr(o, "MULTIFD_INIT")
  if why then return "bad", why end
  local tvb = self.tvb
  local id = u8(tvb, o + 24)
  local item = self:item(o, MF.init_size, "MULTIFD_INIT", "MULTIFD_INIT channel " .. id)
  item:add(f.mf_magic, tvb(o, 4))
  item:add(f.mf_version, tvb(o + 4, 4))
  item:add(f.mf_uuid, tvb(o + 8, 16))
  item:add(f.mf_channel, tvb(o + 24, 1))
  self.st.mode = "multifd"
  return "ok", MF.init_size
end

function Reader:multifd_device_state(o, flags)
  local tvb = self.tvb
  local s, v = self:need(o, MF.device_state_size)
  if s then return s, v end
  local size = u32(tvb, o + MF.device_state_size - 4)
  local total = MF.device_state_size + size
  s, v = self:need(o, total, true)
  if s then return s, v end
  local n = name_length(tvb, o + MF.hdr_size, 256)
  local idstr = tvb(o + MF.hdr_size, n):string()
  local instance = o + MF.device_state_size - 8  -- the instance id, then the size
  local item = self:item(o, total, "MULTIFD_DEVICE_STATE", string.format(
    "MULTIFD_DEVICE_STATE %q instance %d, %d bytes", idstr, u32(tvb, instance), size))
  item:add(f.mf_flags, tvb(o + 8, 4))
  if n > 0 then item:add(f.mf_idstr, tvb(o + MF.hdr_size, n)) end
  item:add(f.mf_instance_id, tvb(instance, 4))
  item:add(f.mf_next_packet_size, tvb(instance + 4, 4))
  if size > 0 then item:add(f.mf_state, tvb(o + MF.device_state_size, size)) end
  return "ok", total
end

function Reader:multifd_packet(o)
  local tvb = self.tvb
  local s, v = self:need(o, MF.hdr_size)
  if s then return s, v end
  local why = self:multifd_hdr(o, "MULTIFD_PACKET")
  if why then return "bad", why end
  local flags = u32(tvb, o + 8)
  local known = MF.sync_flag + MF.compression_mask + (MF.device_state_flag or 0)
  if masked(flags, 0xffffffff - known) ~= 0 then
    return "bad", string.format("MULTIFD_PACKET: flags 0x%x has unknown bits", flags)
  end
  local method = masked(flags, MF.compression_mask)
  local compression = MF.compression[method]
  if not compression then
    return "bad", string.format("MULTIFD_PACKET: unknown compression method 0x%x", method)
  end
  if MF.device_state_flag and has(flags, MF.device_state_flag) then
    return self:multifd_device_state(o, flags)
  end
  s, v = self:need(o, MF.packet_size)
  if s then return s, v end
  local page_count = MF.data_size / PAGE
  local pages_alloc, normal = u32(tvb, o + 12), u32(tvb, o + 16)
  local next_size = u32(tvb, o + 20)
  local zero = MF.zero_pages_in_packet and u32(tvb, o + 32) or 0
  if pages_alloc > page_count then
    return "bad", string.format("MULTIFD_PACKET: pages_alloc %d is more than %d pages",
      pages_alloc, page_count)
  end
  if normal > pages_alloc then
    return "bad", string.format("MULTIFD_PACKET: normal_pages %d is more than pages_alloc %d",
      normal, pages_alloc)
  end
  if zero > pages_alloc - normal then
    return "bad", string.format("MULTIFD_PACKET: zero_pages %d is more than the %d pages left",
      zero, pages_alloc - normal)
  end
  local offsets = o + MF.packet_size
  local payload = 0
  if normal > 0 then payload = method == MF.nocomp and normal * PAGE or next_size end
  local total = MF.packet_size + 8 * page_count + payload
  s, v = self:need(o, total, true)
  if s then return s, v end
  local n = name_length(tvb, o + 64, 256)
  local block = tvb(o + 64, n):string()
  local sync = has(flags, MF.sync_flag)
  local item = self:item(o, total, "MULTIFD_PACKET", string.format(
    "MULTIFD_PACKET %s %s: %d page%s, %d zero%s", tostring(tvb(o + 24, 8):uint64()), block,
    normal, normal == 1 and "" or "s", zero, sync and ", SYNC" or ""))
  item:add(f.mf_flags, tvb(o + 8, 4))
  item:add(f.mf_sync, tvb(o + 8, 4), sync)
  item:add(f.mf_compression, tvb(o + 8, 4), compression)
  item:add(f.mf_pages_alloc, tvb(o + 12, 4))
  item:add(f.mf_normal_pages, tvb(o + 16, 4))
  item:add(f.mf_next_packet_size, tvb(o + 20, 4))
  item:add(f.mf_packet_num, tvb(o + 24, 8))
  if MF.zero_pages_in_packet then item:add(f.mf_zero_pages, tvb(o + 32, 4)) end
  if n > 0 then item:add(f.mf_ramblock, tvb(o + 64, n)) end
  for i = 0, normal - 1 do item:add(f.mf_page, tvb(offsets + 8 * i, 8)) end
  for i = normal, normal + zero - 1 do item:add(f.mf_zero, tvb(offsets + 8 * i, 8)) end
  if payload > 0 then item:add(f.mf_data, tvb(offsets + 8 * page_count, payload)) end
  return "ok", total
end

-- --- top level -------------------------------------------------------------------------

function Reader:top(o)
  local kind = u8(self.tvb, o)
  if kind == ST.COMMAND then return self:command(o) end
  if kind == ST.SECTION_START then return self:section_full(o, "SECTION_START") end
  if kind == ST.SECTION_FULL then return self:section_full(o, "SECTION_FULL") end
  if kind == ST.SECTION_PART then return self:section_short(o, "SECTION_PART") end
  if kind == ST.SECTION_END then return self:section_short(o, "SECTION_END") end
  if kind == ST.EOF then
    self:item(o, 1, "EOF")
    if not self.bounded then self.st.mode = "after_eof" end
    return "ok", 1
  end
  return "bad", string.format("unknown section type 0x%02x", kind)
end

function Reader:after_eof(o)
  local tvb = self.tvb
  if u8(tvb, o) ~= ST.VMDESCRIPTION then
    return "bad", string.format("expected VMDESCRIPTION after EOF, got 0x%02x", u8(tvb, o))
  end
  local s, v = self:need(o, 5)
  if s then return s, v end
  local length = u32(tvb, o + 1)
  s, v = self:need(o, 5 + length, true)
  if s then return s, v end
  local item = self:item(o, 5 + length, "VMDESCRIPTION", "VMDESCRIPTION, " .. length .. " bytes")
  item:add(f.vmdesc, tvb(o + 5, length))
  self.st.mode = "end"
  return "ok", 5 + length
end

function Reader:step(o)
  local mode = self.st.mode
  if mode == "header" then return self:header(o) end
  if mode == "configuration" then return self:configuration(o) end
  if mode == "top" then return self:top(o) end
  if mode == "ram" then return self:ram(o) end
  if mode == "footer" then return self:footer(o) end
  if mode == "device" then return self:device(o) end
  if mode == "after_eof" then return self:after_eof(o) end
  if mode == "multifd_init" then return self:multifd_init(o) end
  if mode == "multifd" then return self:multifd_packet(o) end
  return "bad", "trailing bytes after the end of the stream"
end

-- Dissect records from `o` to the limit. Returns the offset where an incomplete record
-- starts and how many more bytes it needs (-1: unknown), or nil when all was used.
function Reader:run(o)
  while o < self.limit do
    if self.st.mode == "lost" then
      self.tree:add(f.undecoded, self.tvb(o, self.limit - o))
      return nil
    end
    local status, value = self:step(o)
    if status == "ok" then
      o = o + value
    elseif status == "more" then
      return o, value
    else
      local item = self.tree:add(f.undecoded, self.tvb(o, self.limit - o))
      item:add_proto_expert_info(e_malformed, value)
      if not self.bounded then self.st.mode = "lost" end
      return nil
    end
  end
  return nil
end

-- --- the return path -------------------------------------------------------------------

local RP_BODY = {}
function RP_BODY.SHUT(tvb, item, o) item:add(f.rp_status, tvb(o, 4)); return " " .. u32(tvb, o) end
function RP_BODY.PONG(tvb, item, o)
  item:add(f.rp_value, tvb(o, 4))
  return string.format(" 0x%x", u32(tvb, o))
end
RP_BODY.RESUME_ACK = RP_BODY.PONG
function RP_BODY.REQ_PAGES(tvb, item, o)
  item:add(f.rp_start, tvb(o, 8))
  item:add(f.rp_length, tvb(o + 8, 4))
  return string.format(" 0x%x+0x%x", u64(tvb, o), u32(tvb, o + 8))
end
function RP_BODY.REQ_PAGES_ID(tvb, item, o, length)
  local text = RP_BODY.REQ_PAGES(tvb, item, o)
  local n = u8(tvb, o + 12)
  if 13 + n ~= length then return nil, "block name length does not match the message length" end
  item:add(f.rp_block, tvb(o + 13, n))
  return " " .. tvb(o + 13, n):string() .. text
end
function RP_BODY.RECV_BITMAP(tvb, item, o, length)
  local n = u8(tvb, o)
  if 1 + n > length then return nil, "block name runs past the message" end
  item:add(f.rp_block, tvb(o + 1, n))
  return " " .. tvb(o + 1, n):string()
end

local function rp_message(tvb, o, limit, tree, base)
  if o + 4 > limit then return "more", -1 end
  local number, length = u16(tvb, o), u16(tvb, o + 2)
  local spec = PROFILE.rp_messages[number]
  if not spec then
    return "bad", string.format("received invalid message 0x%04x length 0x%04x", number, length)
  end
  local name = spec.name
  if not allows(spec, length) or length > PROFILE.rp_max_length then
    return "bad", name .. ": incorrect length " .. length
  end
  local size = 4 + length
  if o + size > limit then return "more", name == "RECV_BITMAP" and -1 or o + size - limit end
  local bitmap_size
  if name == "RECV_BITMAP" then
    -- A bitmap follows outside the message's length: be64 size, the bitmap, an end mark.
    if o + size + 8 > limit then return "more", -1 end
    bitmap_size = u64(tvb, o + size)
    if o + size + 16 + bitmap_size > limit then
      return "more", o + size + 16 + bitmap_size - limit
    end
    if tvb(o + size + 8 + bitmap_size, 8):bytes():tohex():lower() ~= PROFILE.recv_bitmap_end_mark then
      return "bad", "RECV_BITMAP: bitmap end mark incorrect"
    end
  end
  local total = size + (bitmap_size and 16 + bitmap_size or 0)
  local item = tree:add(f.rp_message, tvb(o, total), name)
  item:add(f.offset, tvb(o, total), UInt64(base + o))
  item:add(f.rp_type, tvb(o, 2))
  item:add(f.rp_len, tvb(o + 2, 2))
  local text = ""
  if RP_BODY[name] then
    local summary, why = RP_BODY[name](tvb, item, o + 4, length)
    if not summary then return "bad", name .. ": " .. why end
    text = summary
  elseif length > 0 then
    item:add(f.payload, tvb(o + 4, length))
  end
  if bitmap_size then
    item:add(f.rp_bitmap_size, tvb(o + size, 8))
    if bitmap_size > 0 then item:add(f.rp_bitmap, tvb(o + size + 8, bitmap_size)) end
  end
  item:set_text("Return path: " .. name .. text)
  return "ok", total, name .. text
end

local function run_return_path(tvb, tree, st, names)
  local o, limit = 0, tvb:len()
  while o < limit do
    if st.mode == "lost" then
      tree:add(f.undecoded, tvb(o, limit - o))
      return nil
    end
    local status, value, name = rp_message(tvb, o, limit, tree, st.pos)
    if status == "ok" then
      names[#names + 1] = name
      o = o + value
    elseif status == "more" then
      return o, value
    else
      local item = tree:add(f.undecoded, tvb(o, limit - o))
      item:add_proto_expert_info(e_malformed, value)
      st.mode = "lost"
      return nil
    end
  end
  return nil
end

-- --- connections -----------------------------------------------------------------------

-- Per direction: the state where the next unseen byte starts. A frame dissected again later
-- (the GUI revisits frames in any order; tshark -2 makes a second pass) starts from a copy of
-- the state it started with the first time. TCP calls again with the same tvbs, or with a
-- reassembled one cut shorter at the end, so a call is known by its frame and where its tvb
-- starts in the frame (0 for a reassembled tvb, which starts where its reassembly did).
-- (TCP's sequence numbers would say more, but fields are not filled in without a tree.)
local directions = {}
local sources = {}  -- conversation -> the direction that carries the stream
local kinds = {}  -- conversation -> main, resumed (a main channel after a pause), preempt, multifd
local snapshots = {}  -- direction/frame/offset -> state
local info_frame = nil  -- the frame whose Info column was last set
local last_stream = nil  -- the state of the main channel's stream seen last

local function endpoint(address, port) return tostring(address) .. ":" .. port end

local function starts_with_magic(tvb)
  return tvb:len() >= 4 and tvb(0, 4):uint() == PROFILE.magic
end

local function starts_multifd(tvb)
  return MF and tvb:len() >= 8 and tvb(0, 4):uint() == MF.magic and tvb(4, 4):uint() == MF.version
end

-- A resumed main channel has no header: the source starts it with a command (RECV_BITMAP).
-- A preempt channel starts with a RAM record's be64 offset, whose top byte is never a
-- section type.
local function starts_with_command(tvb)
  return tvb:len() >= 3 and u8(tvb, 0) == ST.COMMAND and PROFILE.commands[u16(tvb, 1)] ~= nil
end

local CHANNEL_TITLES = {
  main = "QEMU migration stream", resumed = "QEMU migration stream (resumed channel)",
  preempt = "QEMU migration postcopy-preempt channel", multifd = "QEMU migration multifd channel",
}

function qmig.init()
  directions, sources, kinds, snapshots, info_frame, last_stream = {}, {}, {}, {}, nil, nil
end

function qmig.dissector(tvb, pinfo, tree)
  local from = endpoint(pinfo.src, pinfo.src_port)
  local to = endpoint(pinfo.dst, pinfo.dst_port)
  local conversation = from < to and from .. "|" .. to or to .. "|" .. from
  local direction = from .. ">" .. to
  if not sources[conversation] then
    local multifd = starts_multifd(tvb)
    if starts_with_magic(tvb) or multifd or pinfo.dst_port == qmig.prefs.port then
      sources[conversation] = direction
      if starts_with_magic(tvb) then kinds[conversation] = "main"
      elseif multifd then kinds[conversation] = "multifd"
      elseif starts_with_command(tvb) then kinds[conversation] = "resumed"
      else kinds[conversation] = "preempt" end
    else
      sources[conversation] = to .. ">" .. from
      kinds[conversation] = "main"  -- the destination spoke first: a return path
    end
  end
  local is_stream = sources[conversation] == direction
  local kind = kinds[conversation]

  local key = direction .. "/" .. pinfo.number .. "/" .. tvb:offset()
  local st
  if pinfo.visited then
    st = copy(snapshots[key])
    if not st then  -- not a call the first pass saw: its bytes were dissected elsewhere
      st = new_state()
      st.mode = "lost"
    end
  else
    st = directions[direction]
    if not st then
      st = new_state()
      if not is_stream then st.mode = "return path"
      elseif kind == "resumed" then
        -- The same migration goes on: its sections and blocks are the broken channel's. The
        -- record that channel left unfinished is gone; the first RAM record names its block.
        if last_stream then st = copy(last_stream) end
        st.mode, st.pos, st.block = "top", 0, nil
      elseif kind == "multifd" then st.mode = "multifd_init"
      elseif kind == "preempt" then st.mode, st.preempt = "ram", true end
      if is_stream and (kind == "main" or kind == "resumed") then last_stream = st end
      directions[direction] = st
    end
    snapshots[key] = copy(st)
  end

  pinfo.cols.protocol = "QMIG"
  local root = tree:add(qmig, tvb(), is_stream and CHANNEL_TITLES[kind]
    or "QEMU migration return path")
  root:add(f.channel, kind == "resumed" and "main" or kind)
  local incomplete, missing
  local names = {}
  if is_stream then
    local r = reader(tvb, tvb:len(), false, st, root, 0, st.pos)
    r.revisit = pinfo.visited
    r.names = {}
    incomplete, missing = r:run(0)
    names = r.names
    if names.ram then names[#names] = "RAM x" .. names.ram end
  else
    incomplete, missing = run_return_path(tvb, root, st, names)
  end
  if #names > 0 then
    -- The first call for a frame replaces TCP's text; later ones (one frame may end one
    -- reassembled record and hold more) add to it.
    local text = table.concat(names, ", ")
    if info_frame ~= pinfo.number then
      pinfo.cols.info:set(text)
      info_frame = pinfo.number
    else
      pinfo.cols.info:append(", " .. text)
    end
  end
  local used = incomplete or tvb:len()
  st.pos = st.pos + used
  if incomplete then
    pinfo.desegment_offset = incomplete
    pinfo.desegment_len = missing > 0 and missing or DESEGMENT_ONE_MORE_SEGMENT
    if incomplete == 0 then root:set_text("QEMU migration: incomplete record, reassembling") end
  end
  return tvb:len()
end

-- A TCP stream whose first bytes are the header (the magic and this profile's version), or a
-- multifd channel's handshake.
local function heuristic(tvb, pinfo, tree)
  if tvb:len() < 8 then return false end
  local main = starts_with_magic(tvb) and tvb(4, 4):uint() == PROFILE.stream_version
  if not (main or starts_multifd(tvb)) then return false end
  pinfo.conversation = qmig
  qmig.dissector(tvb, pinfo, tree)
  return true
end

local registered_port = qmig.prefs.port
DissectorTable.get("tcp.port"):add(registered_port, qmig)
qmig:register_heuristic("tcp", heuristic)

function qmig.prefs_changed()
  if registered_port ~= qmig.prefs.port then
    DissectorTable.get("tcp.port"):remove(registered_port, qmig)
    registered_port = qmig.prefs.port
    DissectorTable.get("tcp.port"):add(registered_port, qmig)
  end
end
