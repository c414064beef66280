"""The two server-side scripts of targeted delivery on Redis.

Redis hands a stream entry to the member that has been blocked longest, so a
fleet of idle members would take wake-ups in turn, each one cold. Instead each
member that becomes idle records itself, with the time, in the stream's idle
set and waits on an inbox of its own; a publish hands each new entry to the
member that became idle last (a stack, which keeps the work on a few warm
workers) by reading it from the group on that member's behalf and pushing it
into the member's inbox. The entry is then pending for that member like any
read entry, so a member that dies holding it loses it to another after
``claim_timeout``, as before.

Both scripts are atomic, which is what makes "nothing unread while a member is
idle" hold: a member records itself only after finding nothing unread, and a
publish looks for idle members only after adding its entries.

Keys, all under the channel prefix (``>`` never occurs in a channel or group
name, so none of them can be a stream's key):

- ``<stream>>idle``: sorted set, member -> when it became idle (microseconds);
- ``<prefix>>member><consumer>>inbox``: list of ``stream\\nid\\npayload``;
- ``<prefix>>member><consumer>>alive``: present while the member runs (it is
  renewed on every turn; a member killed while idle is skipped once it lapses);
- ``<prefix>>member><consumer>>idle-in``: set of the streams it is idle on;
- ``<stream>>tidy``: present for a tidy interval after a member tidied the stream.
"""

from __future__ import annotations

#: How long a member's marks outlive its last turn, in claim timeouts; an idle
#: member takes a turn at least once per claim timeout.
ALIVE_CLAIM_TIMEOUTS = 3

# Shared by both scripts: drop a consumer from the idle set of every stream it
# is recorded on, except those in ``keep``.
_FORGET = """
local function forget(base, consumer, keep)
  local owned = base .. consumer .. '>idle-in'
  for _, key in ipairs(redis.call('SMEMBERS', owned)) do
    if not keep[key] then
      redis.call('ZREM', key .. '>idle', consumer)
      redis.call('SREM', owned, key)
    end
  end
end
"""

#: A member's turn. KEYS: the streams it takes from. ARGV: group, consumer, member
#: key base, mark lifetime (ms), mode, claim timeout (ms). Modes: ``fresh`` (after
#: a connect: forget the old marks and inbox, read this consumer's own pending
#: entries), ``turn`` (what the inbox holds, else an unread entry, else record
#: itself idle), ``sweep`` (the same, taking entries held longer than the claim
#: timeout before unread ones), ``leave`` (forget every mark). Returns entries as
#: ``stream\\nid\\npayload``.
MEMBER = (
    _FORGET
    + """
local group, consumer, base, ttl, mode, claim = unpack(ARGV)
local found = {}
local function take(key, entries)
  for _, entry in ipairs(entries) do
    local fields = entry[2]
    if fields then
      for i = 1, #fields, 2 do
        if fields[i] == 'p' then
          table.insert(found, key .. '\\n' .. entry[1] .. '\\n' .. fields[i + 1])
        end
      end
    end
  end
end
local function unread(key, start)
  local reply = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', '1',
                           'STREAMS', key, start)
  if reply then take(key, reply[1][2]) end
end
local inbox = base .. consumer .. '>inbox'
if mode == 'leave' then
  forget(base, consumer, {})
  redis.call('DEL', base .. consumer .. '>alive')
  return found
end
if mode == 'fresh' then
  forget(base, consumer, {})
  redis.call('DEL', inbox)
  for _, key in ipairs(KEYS) do unread(key, '0') end
  return found
end
redis.call('SET', base .. consumer .. '>alive', '1', 'PX', ttl)
local item = redis.call('LPOP', inbox)
if item then
  forget(base, consumer, {})
  return {item}
end
if mode == 'sweep' then
  for _, key in ipairs(KEYS) do
    take(key, redis.call('XAUTOCLAIM', key, group, consumer, claim, '0-0', 'COUNT', '1')[2])
  end
end
if #found == 0 then
  for _, key in ipairs(KEYS) do unread(key, '>') end
end
if #found > 0 then
  forget(base, consumer, {})
  return found
end
-- Idle on exactly these streams; one already idle keeps its place (a sweep is no work).
local keep = {}
for _, key in ipairs(KEYS) do keep[key] = true end
forget(base, consumer, keep)
local now = redis.call('TIME')
local score = now[1] .. string.format('%06d', tonumber(now[2]))
local owned = base .. consumer .. '>idle-in'
for _, key in ipairs(KEYS) do
  redis.call('ZADD', key .. '>idle', 'NX', score, consumer)
  redis.call('SADD', owned, key)
end
redis.call('PEXPIRE', owned, ttl)
return found
"""
)

#: A publish. KEYS: the stream. ARGV: group, payload, receivers, stream length cap,
#: member key base, mark lifetime (ms), and the id of an entry this one replaces
#: (given back by a member) or ''. Adds ``receivers`` entries and hands each to the
#: member idle since the latest time; what finds no idle member stays unread for
#: the next member that takes a turn. Returns how many were handed.
HAND_OUT = (
    _FORGET
    + """
local key = KEYS[1]
local group, payload, receivers, maxlen, base, ttl, old = unpack(ARGV)
if old ~= '' then
  redis.call('XACK', key, group, old)
  redis.call('XDEL', key, old)
end
for _ = 1, tonumber(receivers) do
  redis.call('XADD', key, 'MAXLEN', '~', maxlen, '*', 'p', payload)
end
local handed = 0
while handed < tonumber(receivers) do
  local top = redis.call('ZPOPMAX', key .. '>idle')
  if #top == 0 then break end
  local consumer = top[1]
  forget(base, consumer, {})
  if redis.call('EXISTS', base .. consumer .. '>alive') == 1 then
    local reply = redis.pcall('XREADGROUP', 'GROUP', group, consumer, 'COUNT', '1',
                              'STREAMS', key, '>')
    if type(reply) ~= 'table' or reply.err then break end
    local entry = reply[1][2][1]
    local inbox = base .. consumer .. '>inbox'
    redis.call('RPUSH', inbox, key .. '\\n' .. entry[1] .. '\\n' .. payload)
    redis.call('PEXPIRE', inbox, ttl)
    handed = handed + 1
  end
end
return handed
"""
)

#: Drop from a stream's idle set the members whose marks lapsed (killed while idle
#: and never handed anything since), unless another member did within the tidy
#: interval: every member tidies on its own clock, and a fleet of N that each went
#: through an idle set of N would make the tidy O(N^2). KEYS: the stream. ARGV:
#: member key base, tidy interval (ms). Returns how many went, or -1 when another
#: member's tidy is recent (the caller then leaves the group's consumers alone too).
PRUNE = """
local base, interval = ARGV[1], ARGV[2]
if not redis.call('SET', KEYS[1] .. '>tidy', '1', 'NX', 'PX', interval) then
  return -1
end
local gone = 0
for _, consumer in ipairs(redis.call('ZRANGE', KEYS[1] .. '>idle', 0, -1)) do
  if redis.call('EXISTS', base .. consumer .. '>alive') == 0 then
    redis.call('ZREM', KEYS[1] .. '>idle', consumer)
    gone = gone + 1
  end
end
return gone
"""
