//! Retention trimming as one server-side script: the cut is computed and applied inside Redis.
//!
//! Owns the Lua source behind [`super::Client::trim_retained`]. The script works out the oldest id the
//! rules let go — the `max_len`-th newest entry (found by walking back in pages that hold ids only),
//! and the age cut the caller computed — lowers it to what every group of the stream still needs (its
//! oldest pending entry, and its last delivered one with everything after it), and trims before it with
//! XTRIM MINID. Nothing travels but two numbers and an id, and because it runs atomically no group can
//! move between the computation and the trim. Its one write is its last command: a failure anywhere
//! leaves the stream as it was, and running it again is harmless.

/// KEYS[1] the stream. ARGV[1] the most entries to keep (`''` for no limit); ARGV[2] the id before
/// which entries are old enough to go (`''` for no age rule). Returns `{removed, cut}`, `cut` being
/// `''` when the rules let nothing go.
pub(super) const SOURCE: &str = r#"
local key = KEYS[1]
if redis.call('TYPE', key)['ok'] ~= 'stream' then return {0, ''} end
local function num_cmp(a, b)
  if #a ~= #b then return #a < #b and -1 or 1 end
  if a == b then return 0 end
  return a < b and -1 or 1
end
-- Stream ids compared as numbers, digit strings of any length (Lua numbers lose precision past 2^53).
local function before(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  local c = num_cmp(am, bm)
  if c ~= 0 then return c < 0 end
  return num_cmp(as, bs) < 0
end
local cut = nil
if ARGV[2] ~= '' then cut = ARGV[2] end
if ARGV[1] ~= '' then
  local keep = tonumber(ARGV[1])
  if redis.call('XLEN', key) > keep then
    -- The oldest entry to keep is the keep-th newest: walk back a page at a time.
    local left, last, from = keep, nil, '+'
    while left > 0 do
      local page = redis.call('XREVRANGE', key, from, '-', 'COUNT', math.min(left, 512))
      if #page == 0 then break end
      last = page[#page][1]
      left = left - #page
      from = '(' .. last
    end
    if last and (cut == nil or before(cut, last)) then cut = last end
  end
end
if cut == nil then return {0, ''} end
for _, row in ipairs(redis.call('XINFO', 'GROUPS', key)) do
  local g = {}
  for i = 1, #row, 2 do g[row[i]] = row[i + 1] end
  local delivered = g['last-delivered-id']
  if before(delivered, cut) then cut = delivered end
  if g['pending'] > 0 then
    local oldest = redis.call('XPENDING', key, g['name'])[2]
    if oldest and before(oldest, cut) then cut = oldest end
  end
end
if cut == '0-0' then return {0, cut} end
return {redis.call('XTRIM', key, 'MINID', cut), cut}
"#;
