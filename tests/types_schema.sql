-- The type matrix (issue 12, deliverable 6): tests/test_types.py loads this file into an empty
-- local stack (tests/local_supabase.py) and checks that every value comes back exactly, as
-- PostgreSQL's own `::text` of it, through backup, restore, rollback and diff.
--
-- One table per family of kinds, a few rows each, every value at an edge; each value's kind is
-- in the comment next to it. Rows are small except two on purpose: a 5 MB text value
-- (t_big_text) and JSON nested 2,000 levels deep (t_json_deep). Every table has explicit keys
-- and no defaults but t_serial_keys' sequence, so that the tests can put back a pristine copy
-- with INSERT ... SELECT *.
--
-- Kinds of column (and key) covered, counted in tests/test_types.py's report:
--   integers: smallint, integer, bigint (min, max, 0, -1)
--   numeric (unconstrained, huge precision, trailing zeros, NaN, +-Infinity), numeric(p,s)
--   real, double precision (-0, NaN, +-Infinity, subnormals, 0.1, max, min normal)
--   money
--   text, varchar(n), varchar, char(n), char, name, "char"
--   bytea, boolean
--   date, timestamp, timestamp(0), timestamptz, timestamptz(3) (4713 BC, 294276 AD, +-infinity)
--   time, time(3), timetz, interval (negative, huge, mixed signs, equal-but-not-identical)
--   uuid, inet, cidr, macaddr, macaddr8, bit(n), varbit
--   tsvector, tsquery, xml, jsonpath
--   point, line, lseg, box, path (open and closed), polygon, circle
--   int4range, int8range, numrange, tsrange, tstzrange, daterange (empty, unbounded)
--   int4multirange, nummultirange, datemultirange, tstzmultirange
--   oid, xid, xid8, tid, pg_lsn, pg_snapshot, regtype
--   citext (only when the extension is available)
--   arrays: int[] with a lower bound other than 1, 2-D int[][], NULL elements, empty arrays,
--     numeric[], text[], jsonb[] with a JSON null element, float8[], bool[], uuid[],
--     timestamptz[], bytea[], enum[], composite[], domain[]
--   enums with odd labels; domains (over numeric(20,2), over text with a CHECK, over int[]);
--   composites (numeric and jsonb fields, nested, NULL fields)
--   json and jsonb edge values; json values the API cannot carry: JSON null as the whole value
--     (t_json_null), spaces around a value (t_json_outer_space), a bare string's escapes
--     (t_json_string_escapes), an escaped NUL (t_json_nul)
--   awkward identifiers: table and column names with spaces, commas, dots, quotes,
--     uppercase, reserved words, unicode
--   keys: text (spaces, commas, parentheses, quotes, backslashes, filter syntax), float8 (-0,
--     NaN, +-Infinity), numeric (1.50), uuid, date (BC, +-infinity), bigserial, multi-column
--     with awkward names, COLLATE "C" and COLLATE "unicode" text keys
--   no primary key, every row several times; a partitioned table with two partitions
--   foreign keys: a nullable DEFERRABLE cycle, a 150-deep self-referencing chain with a
--     self-loop, a multi-column foreign key, a text-keyed foreign key, and a NOT NULL cycle
--     (t_nn_cycle_x/y: cannot be carried)

-- --- types ---------------------------------------------------------------------------------

CREATE TYPE odd_enum AS ENUM (
  'plain',            -- enum label: plain
  'with space',       -- enum label: an inner space
  'it''s',            -- enum label: a single quote
  'quote"d',          -- enum label: a double quote
  'comma,label',      -- enum label: a comma (array syntax)
  '{brace}',          -- enum label: braces (array syntax)
  'NULL',             -- enum label: the word NULL (array syntax)
  ' ',                -- enum label: a single space (empty-ish)
  'back\slash',       -- enum label: a backslash
  'ünï 🎉'            -- enum label: unicode and an emoji
);

CREATE DOMAIN amount_20_2 AS numeric(20, 2);                                -- domain over numeric(20,2)
CREATE DOMAIN slug AS text CHECK (VALUE ~ '^[a-z0-9]+(-[a-z0-9]+)*$');     -- domain over text, CHECK
CREATE DOMAIN int_list AS integer[] CHECK (cardinality(VALUE) <= 5);       -- domain over an array

CREATE TYPE pair AS (amount numeric, meta jsonb);                          -- composite: numeric + jsonb
CREATE TYPE nested AS (label text, inner_pair pair, tags text[]);          -- composite nesting one

-- citext only where the extension is available (it is in Supabase, in schema extensions).
DO $$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'citext') THEN
    CREATE EXTENSION IF NOT EXISTS citext WITH SCHEMA extensions;
    EXECUTE 'CREATE TABLE t_citext (id int PRIMARY KEY, ci extensions.citext)';
    EXECUTE $i$INSERT INTO t_citext VALUES
      (1, 'MiXeD Case'),   -- citext: mixed case (kept as written)
      (2, 'straße ß'),     -- citext: unicode
      (3, ' padded '),     -- citext: spaces
      (4, NULL)$i$;        -- citext: NULL
  END IF;
END $$;

-- --- scalars -------------------------------------------------------------------------------

CREATE TABLE t_integers (id int PRIMARY KEY, small smallint, int4 integer, big bigint);
INSERT INTO t_integers VALUES
  (1, 32767, 2147483647, 9223372036854775807),         -- smallint/integer/bigint max
  (2, -32768, -2147483648, -9223372036854775808),      -- smallint/integer/bigint min
  (3, 0, 0, 0),                                        -- zeros
  (4, -1, -1, -1),                                     -- minus one
  (5, NULL, NULL, NULL);                               -- NULLs

CREATE TABLE t_numerics (id int PRIMARY KEY, n numeric, n_30_10 numeric(30, 10));
INSERT INTO t_numerics VALUES
  (1, '1.000000', '1.5'),                              -- numeric trailing zeros; numeric(30,10) pads 1.5000000000
  (2, '12345678901234567890.123456789', '12345678901234567890.1234567891'),  -- numeric beyond a double; numeric(30,10) full
  (3, '1.50', '0'),                                    -- numeric 1.50 (equal to 1.5, not identical); numeric(30,10) zero
  (4, 'NaN', 'NaN'),                                   -- numeric NaN
  (5, 'Infinity', NULL),                               -- numeric +Infinity (PG14+; numeric(p,s) refuses it)
  (6, '-Infinity', NULL),                              -- numeric -Infinity (PG14+)
  (7, '-0.000', '-0.0000000001'),                      -- numeric negative zero with scale; smallest numeric(30,10)
  (8, ('0.' || repeat('0', 399) || '1')::numeric, NULL),   -- numeric 1e-400 written out (scale 400)
  (9, (repeat('9', 1000) || '.' || repeat('9', 1000))::numeric, NULL),  -- numeric with 2,000 digits
  (10, '-12345678901234567890.000000000000', NULL),    -- numeric negative with trailing zeros
  (11, NULL, NULL);                                    -- NULLs

CREATE TABLE t_floats (id int PRIMARY KEY, r real, d double precision);
INSERT INTO t_floats VALUES
  (1, '-0', '-0'),                                     -- real/double negative zero
  (2, 'NaN', 'NaN'),                                   -- real/double NaN
  (3, 'Infinity', 'Infinity'),                         -- real/double +Infinity
  (4, '-Infinity', '-Infinity'),                       -- real/double -Infinity
  (5, '0.1', '0.1'),                                   -- real/double 0.1 (not a binary fraction)
  (6, '1e-45', '1e-300'),                              -- real subnormal; double 1e-300
  (7, '1.1754942e-38', '5e-324'),                      -- real subnormal below min normal; double smallest subnormal
  (8, '3.4028235e38', '1.7976931348623157e308'),       -- real/double max
  (9, '1.17549435e-38', '2.2250738585072014e-308'),    -- real/double min normal
  (10, '-123.456', '-0.30000000000000004'),            -- real/double ordinary, shortest round trip
  (11, NULL, NULL);                                    -- NULLs

CREATE TABLE t_money (id int PRIMARY KEY, m money);
INSERT INTO t_money VALUES
  (1, '-92233720368547758.08'),                        -- money min
  (2, '92233720368547758.07'),                         -- money max
  (3, '0'),                                            -- money zero
  (4, '1234.5'),                                       -- money with a thousands separator in its text
  (5, NULL);                                           -- NULL

CREATE TABLE t_texts (id int PRIMARY KEY, t text, vc varchar(10), vcu varchar, c char(10),
                      c1 char, nm name);
INSERT INTO t_texts VALUES
  (1, 'ünïcødé Ωμέγα 中文 עברית', 'ünïcødé', 'ünï', 'ü', 'ü', 'ünï'),   -- unicode in every text kind
  (2, 'emoji 🎉👩‍👩‍👧 flags 🇫🇷', '🎉🎉🎉', '👩‍👩‍👧', '🎉', '🎉', '🎉'),   -- emoji, ZWJ sequences
  (3, E'ctl \x01\x02\x07\b\t\n\x0b\f\r\x1b\x1f\x7f end', E'\t\n', E'\r\n', E'\x01', E'\x1f', E'\x7f'),  -- NUL-free control chars
  (4, 'back\slash \\ \n \u0041 \x41', '\\', 'a\b', '\', '\', '\\'),    -- backslashes (standard strings)
  (5, 'single '' double " back ` both ''"', '''"', '"', '''', '"', '"'''),  -- quotes
  (6, '', '', '', '', ' ', ''),                        -- empty strings; char(10) of '' is 10 spaces
  (7, '   ', ' ', '  lead', 'ab', 'a', ' sp '),        -- spaces only, leading; char(10) pads 'ab'
  (8, 'trail   ', 'trail ', 'trail  ', 'ab  ', 'z', 'trail '),  -- trailing spaces kept (text/varchar)
  (9, 'NULL', 'null', 'None', 'NULL', 'N', 'null'),    -- the words NULL/null, not SQL NULL
  (10, '{"not":"json"}', '[1,2]', '<b>', '{}', '{', '[]'),  -- text that looks like JSON/arrays/markup
  (11, 'x', '0123456789', repeat('long ', 2000), '0123456789', 'x',
       repeat('n', 63)),                               -- varchar(10) full, char(10) full, name of 63 bytes
  (12, NULL, NULL, NULL, NULL, NULL, NULL);            -- NULLs

CREATE TABLE t_big_text (id int PRIMARY KEY, body text);
INSERT INTO t_big_text VALUES
  (1, repeat(E'0123456789 abcdefghij ünï 🎉 "q" \\ \t', 150000)),  -- text of about 5.5 MB with escapes
  (2, 'small');                                        -- a small value next to it

CREATE TABLE t_bytea (id int PRIMARY KEY, b bytea);
INSERT INTO t_bytea VALUES
  (1, '\x'),                                           -- bytea empty
  (2, '\x00ff00'),                                     -- bytea with NUL bytes
  (3, (SELECT string_agg(set_byte('\x00'::bytea, 0, i), ''::bytea ORDER BY i)
       FROM generate_series(0, 255) AS i)),            -- bytea: every byte value
  (4, convert_to('ünï 🎉', 'UTF8')),                   -- bytea holding UTF-8
  (5, NULL);                                           -- NULL

CREATE TABLE t_bool (id int PRIMARY KEY, b boolean);
INSERT INTO t_bool VALUES (1, true), (2, false), (3, NULL);  -- boolean true, false, NULL

CREATE TABLE t_datetimes (id int PRIMARY KEY, d date, ts timestamp, ts0 timestamp(0),
                          tstz timestamptz, tstz3 timestamptz(3));
INSERT INTO t_datetimes VALUES
  (1, '4714-11-24 BC', '4714-11-24 00:00:00 BC', '4713-01-01 00:00:00 BC',
      '4714-11-24 00:00:00+00 BC', '4713-01-01 12:00:00.123+00 BC'),        -- the earliest: 4713/4714 BC
  (2, '5874897-12-31', '294276-12-31 23:59:59.999999', '294276-12-31 23:59:59',
      '294276-12-31 23:59:59.999999+00', '294276-12-31 23:59:59.999+00'),   -- the latest: date 5874897 AD, timestamp 294276 AD
  (3, 'infinity', 'infinity', 'infinity', 'infinity', 'infinity'),          -- +infinity
  (4, '-infinity', '-infinity', '-infinity', '-infinity', '-infinity'),     -- -infinity
  (5, '2000-02-29', '2024-01-01 00:00:00.000001', '1999-12-31 23:59:59',
      '1999-12-31 23:59:59.5+05:30', '2024-06-30 23:59:59.999+14'),         -- leap day, a microsecond, offsets
  (6, '0001-01-01', '0001-01-01 00:00:00', '0001-12-31 23:59:59 BC',
      '1970-01-01 00:00:00+00', '1969-12-31 23:59:59.999-00:00:01'),        -- year 1, 1 BC, the epoch, second offsets
  (7, NULL, NULL, NULL, NULL, NULL);                                        -- NULLs

CREATE TABLE t_times (id int PRIMARY KEY, t time, t3 time(3), ttz timetz, i interval);
INSERT INTO t_times VALUES
  (1, '00:00:00', '00:00:00', '00:00:00+15:59', '-178000000 years'),        -- midnight, max offset, most negative interval
  (2, '24:00:00', '23:59:59.999', '24:00:00-15:59', '178000000 years'),      -- 24:00, min offset, largest interval
  (3, '23:59:59.999999', '12:00:00.5', '12:34:56.789-03:30', '-1 days +02:03:04.5'),  -- microseconds; mixed-sign interval
  (4, '12:00', '12:00', '12:00+00', '1 mon -1 days'),                        -- mixed-sign months and days
  (5, '01:02:03', '01:02:03', '01:02:03+01', '1 day'),                       -- interval 1 day
  (6, '01:02:03', '01:02:03', '01:02:03+01', '24:00:00'),                    -- interval 24 hours: = 1 day, not identical
  (7, '00:00:00.000001', '00:00:00.001', '00:00:00.000001+00', '-00:00:00.000001'),  -- smallest steps
  (8, '13:14:15', '13:14:15', '13:14:15+05:45', 'P1Y2M3DT4H5M6.789S'),       -- ISO 8601 interval input
  (9, NULL, NULL, NULL, 'infinity'),                                         -- interval +infinity (PG17)
  (10, NULL, NULL, NULL, NULL);                                              -- NULLs

CREATE TABLE t_network (id int PRIMARY KEY, ip inet, net cidr, mac macaddr, mac8 macaddr8);
INSERT INTO t_network VALUES
  (1, '192.168.0.1/24', '192.168.0.0/24', '08:00:2b:01:02:03', '08:00:2b:01:02:03:04:05'),  -- inet with host bits and mask
  (2, '::ffff:1.2.3.4', '2001:db8::/32', 'ff:ff:ff:ff:ff:ff', 'ff:ff:ff:ff:ff:ff:ff:ff'),  -- IPv4-mapped IPv6, IPv6 cidr, max macs
  (3, '2001:db8::1/64', '0.0.0.0/0', '00:00:00:00:00:00', '00:00:00:00:00:00:00:00'),   -- IPv6 with prefix, the whole v4 net, zero macs
  (4, '0.0.0.0', '255.255.255.255/32', '08-00-2b-01-02-03', '0800.2b01.0203.0405'),     -- host /32; macs written another way
  (5, '::', '::/0', NULL, NULL),                                                           -- IPv6 unspecified, the whole v6 net
  (6, NULL, NULL, NULL, NULL);                                                             -- NULLs

CREATE TABLE t_bits (id int PRIMARY KEY, b bit(8), vb varbit, vb10 bit varying(10));
INSERT INTO t_bits VALUES
  (1, B'10101010', B'', B'1'),                         -- bit(8); varbit empty; one bit
  (2, B'00000000', B'0', B'1111111111'),               -- all zeros; a single 0; varbit(10) full
  (3, B'11111111', repeat('10', 500)::varbit, B'0'),   -- all ones; varbit of 1,000 bits
  (4, NULL, NULL, NULL);                               -- NULLs

CREATE TABLE t_text_search (id int PRIMARY KEY, v tsvector, q tsquery);
INSERT INTO t_text_search VALUES
  (1, 'a:1A fat:2B,4C cat:5D', 'fat & (rat | !cat) <-> dog:*'),   -- tsvector positions/weights; tsquery operators, prefix
  (2, $$'''quoted''' 'sp ace' ünï:1 'back\\slash'$$,
      $$'sp ace' & 'it''s':* & !'ünï'$$),              -- lexemes with quotes, spaces, unicode, backslashes
  (3, '', ''),                                         -- empty tsvector and tsquery
  (4, NULL, NULL);                                     -- NULLs

CREATE TABLE t_xml (id int PRIMARY KEY, x xml);
INSERT INTO t_xml VALUES
  (1, '<a b="1" c=''2''>&amp;text &lt;&gt;<!-- c --><![CDATA[<x>&]]></a>'),  -- xml document: entities, comment, CDATA
  (2, 'text <b>fragment</b> tail'),                    -- xml content fragment
  (3, '<?xml version="1.0"?><r xmlns:n="urn:x"><n:e/></r>'),  -- xml declaration, namespaces
  (4, '<u>ünï 🎉</u>   '),                               -- xml unicode, trailing spaces
  (5, NULL);                                           -- NULL

CREATE TABLE t_geometry (id int PRIMARY KEY, p point, l line, s lseg, b box, pa path,
                         po polygon, c circle);
INSERT INTO t_geometry VALUES
  (1, '(1.5,-2.25)', '{1,-1,0}', '[(0,0),(1,1)]', '(1,1),(0,0)', '[(0,0),(1,1),(2,0)]',
      '((0,0),(1,1),(2,0))', '<(0,0),1.5>'),           -- ordinary; open path
  (2, '(-0,NaN)', '{0,1,-0.1}', '[(-0,0.1),(1e-300,1e300)]', '(0.1,0.1),(-0.1,-0.1)',
      '((0,0),(1,0),(1,1))', '((0.1,0.2))', '<(1e-300,-0),0>'),  -- -0, NaN, 0.1, tiny/huge; closed path; one-point polygon
  (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL);       -- NULLs

CREATE TABLE t_ranges (id int PRIMARY KEY, i4 int4range, i8 int8range, n numrange, ts tsrange,
                       tstz tstzrange, d daterange);
INSERT INTO t_ranges VALUES
  (1, 'empty', 'empty', 'empty', 'empty', 'empty', 'empty'),                 -- empty ranges
  (2, '(,)', '(,)', '(,)', '(,)', '(,)', '(,)'),                             -- unbounded both sides
  (3, '[1,10)', '[-9223372036854775808,9223372036854775807)', '[1.50,2.500]',
      '[2020-01-01,2020-01-02)', '[-infinity,infinity]', '[2020-01-01,2020-01-01]'),  -- bounds; numrange trailing zeros; infinite bounds; normalised daterange
  (4, '[5,)', '(,5]', '(-1.0,)', '(,"2020-01-01 00:00:00.000001"]',
      '("2020-01-01 00:00:00+00",)', '[4714-11-24 BC,)'),                  -- half-unbounded; BC bound
  (5, NULL, NULL, NULL, NULL, NULL, NULL);                                   -- NULLs

CREATE TABLE t_multiranges (id int PRIMARY KEY, i4m int4multirange, nm nummultirange,
                            dm datemultirange, tstzm tstzmultirange);
INSERT INTO t_multiranges VALUES
  (1, '{}', '{}', '{}', '{}'),                                               -- empty multiranges
  (2, '{[1,3),[5,7)}', '{[1.50,2.50),[3.000,4]}', '{[2020-01-01,2020-02-01),[2021-01-01,)}',
      '{[-infinity,2020-01-01),(2021-01-01,infinity]}'),                     -- several ranges; trailing zeros; infinite bounds
  (3, '{(,0],[10,)}', '{(,)}', '{(,)}', '{(,)}'),                            -- unbounded pieces
  (4, NULL, NULL, NULL, NULL);                                               -- NULLs

CREATE TABLE t_system (id int PRIMARY KEY, o oid, x xid, x8 xid8, ti tid, lsn pg_lsn,
                       snap pg_snapshot, ch "char", jp jsonpath, rt regtype, u uuid);
INSERT INTO t_system VALUES
  (1, 0, '0', '0', '(0,0)', '0/0', '10:20:10,14,15', 'x', '$.a[*] ? (@ > 1.50)',
      'integer', '00000000-0000-0000-0000-000000000000'),                    -- zeros; jsonpath with 1.50; nil uuid
  (2, 4294967295, '4294967295', '18446744073709551615', '(4294967295,65535)',
      'FFFFFFFF/FFFFFFFF', '100:100:', 'é', 'strict $."key with space".** ? (@ like_regex "^a.*" flag "i")',
      'timestamp with time zone[]', 'ffffffff-ffff-ffff-ffff-ffffffffffff'),  -- maxima; multibyte "char"; max uuid
  (3, 1, '3', '3', '(1,1)', '16/B374D848', '1:1:', E'\\', '$', '"char"',
      'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11'),                               -- backslash "char"; quoted type name; uppercase uuid input
  (4, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);           -- NULLs

-- --- arrays, enums, domains, composites -------------------------------------------------

CREATE TABLE t_arrays (id int PRIMARY KEY, ia int[], ia2 int[][], na numeric[], ta text[],
                       ja jsonb[], fa float8[], ba bool[], ua uuid[], tsa timestamptz[],
                       bya bytea[], ca pair[], da int_list);
INSERT INTO t_arrays VALUES
  (1, '[0:2]={1,2,3}', '{{1,2},{3,4}}', '{1.000,2.50}',
      '{"a,b","c\"d","{e}","NULL",NULL,""," sp ","back\\slash","ünï 🎉"}',
      ARRAY['null'::jsonb, NULL, '{"a": 19.90}', '"NULL"', '[]'],
      '{-0,NaN,Infinity,-Infinity,0.1,5e-324}', '{t,f,NULL}',
      '{00000000-0000-0000-0000-000000000000,NULL}',
      ARRAY['4714-11-24 00:00:00+00 BC'::timestamptz, 'infinity', '2024-01-01 00:00:00.000001+00'],
      ARRAY['\x'::bytea, '\x00ff', NULL], ARRAY[ROW(1.50, '{"b": 1.0}')::pair, NULL],
      '[5:6]={7,8}'),                                  -- lower bound 0; 2-D; numeric trailing zeros; text with quotes/commas/braces/"NULL"; jsonb[] with JSON null and SQL NULL; float8 specials; NULL elements; composite[]; domain over int[] with lower bound 5
  (2, '{}', '[-1:0][2:3]={{1,2},{3,4}}', '{NaN,Infinity,-0.0}', '{}',
      '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}'), -- empty arrays; 2-D with lower bounds -1 and 2
  (3, '{NULL}', '{{NULL,1},{2,NULL}}', '{NULL}', '{NULL,"NULL","null",""}',
      ARRAY[NULL::jsonb], '{NULL}', '{NULL}', '{NULL}', '{NULL}', '{NULL}', '{NULL}', '{NULL}'),  -- arrays of one NULL
  (4, '{1,NULL,3}', '{{1},{2}}', '{12345678901234567890.123456789}', '{"{","}",",","\"","\\"}',
      ARRAY['1.000000'::jsonb, '12345678901234567890.5', '"\u00e9"'],
      '{1e-300,-1.7976931348623157e308}', '{true}', '{ffffffff-ffff-ffff-ffff-ffffffffffff}',
      '{-infinity}', '{"\\\\x5c"}', ARRAY[ROW(NULL, NULL)::pair], NULL),  -- NULL in the middle; single-char syntax elements; numbers in jsonb[]
  (5, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);  -- NULL arrays

CREATE TABLE t_enums (id int PRIMARY KEY, mood odd_enum, moods odd_enum[]);
INSERT INTO t_enums VALUES
  (1, 'plain', '{plain}'),                             -- enum plain label
  (2, 'with space', '{"with space",plain}'),           -- enum label with a space
  (3, 'it''s', '{"it''s"}'),                           -- enum label with a single quote
  (4, 'quote"d', '{"quote\"d"}'),                      -- enum label with a double quote
  (5, 'comma,label', '{"comma,label","{brace}"}'),     -- enum labels with array syntax
  (6, 'NULL', '{"NULL",NULL}'),                        -- enum label NULL next to an SQL NULL element
  (7, ' ', '{" "}'),                                   -- enum label of one space
  (8, 'back\slash', '{"back\\slash"}'),                -- enum label with a backslash
  (9, 'ünï 🎉', '{"ünï 🎉"}'),                         -- enum label with unicode and an emoji
  (10, '{brace}', '{}'),                               -- enum label with braces; empty enum[]
  (11, NULL, NULL);                                    -- NULLs

CREATE TABLE t_domains (id int PRIMARY KEY, amount amount_20_2, code slug);
INSERT INTO t_domains VALUES
  (1, 123456789012345678.91, 'abc-123'),               -- domain numeric(20,2) at 18+2 digits; domain text
  (2, -0.01, 'a'),                                     -- domain numeric(20,2) smallest step
  (3, 5, 'x-y-z'),                                     -- domain numeric(20,2) padded to 5.00
  (4, NULL, NULL);                                     -- NULLs (the CHECK allows NULL)

CREATE TABLE t_composites (id int PRIMARY KEY, p pair, n nested);
INSERT INTO t_composites VALUES
  (1, ROW(1.50, '{"price": 19.90, "n": null}'),
      ROW('a,"b" (c)', ROW(2.500, '[1.0, 1e-400]'), ARRAY['x', 'NULL', NULL])),   -- numeric 1.50 and jsonb numbers in a composite; nested composite
  (2, ROW(NULL, NULL), ROW(NULL, NULL, NULL)),         -- composites with every field NULL
  (3, ROW(NULL, 'null'), ROW('', ROW(NULL, NULL), '{}')),  -- jsonb null field; empty text; nested all-NULL; empty array
  (4, ROW('NaN', '"\\"'), ROW(' ', NULL, '{" "}')),    -- numeric NaN field; jsonb string with a backslash
  (5, NULL, NULL);                                     -- NULL composites

-- --- json and jsonb ------------------------------------------------------------------------

CREATE TABLE t_json (id int PRIMARY KEY, doc_json json, doc_jsonb jsonb);
INSERT INTO t_json VALUES
  (1, '19.90', '19.90'),                               -- number with a trailing zero
  (2, '1.000000', '1.000000'),                         -- number 1 with six zeros
  (3, '12345678901234567890.5', '12345678901234567890.5'),  -- number beyond a double
  (4, '3.141592653589793238462643383279', '3.141592653589793238462643383279'),  -- 31 digits of pi
  (5, '1e-400', '1e-400'),                             -- below a double's range (jsonb writes 400 decimals)
  (6, '1.5e3', '1.5e3'),                               -- exponent notation (jsonb writes 1500)
  (7, '-0', '-0'),                                     -- negative zero (jsonb writes 0)
  (8, '1e400', '1e400'),                               -- above a double's range (jsonb writes 401 digits)
  (9, '1e200000', NULL),                               -- beyond numeric: json only, jsonb refuses it
  (10, '{ "a" : [ 1 , 2 ] ,
   "b":	{} }', '  { "a" : [ 1 , 2 ] , "b": {} }  '),  -- whitespace inside, a newline and a tab (json keeps it)
  (11, '{"b":1, "a":2, "a":3}', '{"b":1, "a":2, "a":3}'),  -- key order and duplicate keys (json keeps both)
  (12, '["\u00e9\ud83d\ude00 \u0041 \" \\ \/"]', '"\u00e9\ud83d\ude00 \u0041 \" \\ \/"'),  -- unicode and other escapes (json keeps them inside an array; jsonb decodes)
  (13, '{"s": "\u00e9 \/", "\u0041": 1}', '{"s": "\u00e9 \/", "\u0041": 1}'),  -- escapes in an object's strings and keys
  (14, '"a bare string"', '"a bare string"'),          -- a bare string at top level
  (15, '42', '42'),                                    -- a bare number at top level
  (16, 'true', 'true'),                                -- bare true at top level
  (17, 'false', 'false'),                              -- bare false at top level
  (18, '{}', '{}'),                                    -- empty object
  (19, '[]', '[]'),                                    -- empty array
  (20, '{"a": null, "n": [null, 1.0]}', '{"a": null, "n": [null, 1.0]}'),  -- JSON null inside: fine
  (21, '"NULL"', '"null"'),                            -- the strings NULL and null
  (22, '{"ünï 🎉": "ω", "": ""}', '{"ünï 🎉": "ω", "": ""}'),  -- unicode and empty keys
  (23, '[1.10, 2.200, {"x": 19.90}]', '[1.10, 2.200, {"x": 19.90}]'),  -- numbers with trailing zeros nested
  (24, NULL, NULL);                                    -- SQL NULLs

CREATE TABLE t_json_deep (id int PRIMARY KEY, doc_json json, doc_jsonb jsonb);
INSERT INTO t_json_deep VALUES
  (1, (repeat('[', 2000) || '1.50' || repeat(']', 2000))::json,
      (repeat('[', 2000) || '1.50' || repeat(']', 2000))::jsonb),          -- arrays nested 2,000 levels
  (2, (repeat('{"k": ', 2000) || 'null' || repeat('}', 2000))::json,
      (repeat('{"k": ', 2000) || 'null' || repeat('}', 2000))::jsonb);    -- objects nested 2,000 levels

-- JSON null as the whole value: the API writes it as SQL NULL, so a restore must refuse the
-- table (exit 7) unless --accept-json-null is given.
CREATE TABLE t_json_null (id int PRIMARY KEY, doc_json json, doc_jsonb jsonb);
INSERT INTO t_json_null VALUES
  (1, 'null', 'null'),                                 -- JSON null as the whole value
  (2, NULL, NULL),                                     -- SQL NULL
  (3, '[null]', '{"a": null}'),                        -- JSON null inside a value
  (4, ' null ', '"null"');                             -- JSON null with spaces (json); the string "null"

-- More json values the API cannot carry (PostgREST writes a json column through
-- json_to_recordset, which keeps a value's own text but not the spaces around it, decodes the
-- escapes of a bare string, and refuses \u0000 anywhere): a restore must refuse each (exit 7).
CREATE TABLE t_json_outer_space (id int PRIMARY KEY, doc_json json);
INSERT INTO t_json_outer_space VALUES
  (1, '  {"a": 1}  '),                                 -- json with spaces around the value
  (2, '{"a": 1}');                                     -- the same without them (carriable)

CREATE TABLE t_json_string_escapes (id int PRIMARY KEY, doc_json json);
INSERT INTO t_json_string_escapes VALUES
  (1, '"\u00e9 \/ \u0041"'),                            -- a bare json string with escapes
  (2, '"plain"');                                      -- a bare json string without (carriable)

CREATE TABLE t_json_nul (id int PRIMARY KEY, doc_json json);
INSERT INTO t_json_nul VALUES
  (1, '{"a": "\u0000"}'),                              -- json holding an escaped NUL (jsonb refuses it too)
  (2, '{"a": "\u0001"}');                              -- another control character (carriable)

-- --- awkward identifiers -------------------------------------------------------------------

CREATE TABLE "Weird ""Table"", with.dots" (
  "Row ID" int PRIMARY KEY,                            -- key column: uppercase and a space
  "with space" text,                                   -- a space
  "a,b" int,                                           -- a comma
  "a.b" text,                                          -- a dot
  "quote""d" text,                                     -- a double quote
  "UPPER" text,                                        -- uppercase
  "select" text,                                       -- reserved word
  "from" int,                                          -- reserved word
  "order" int,                                         -- reserved word
  "ünï 名前 🎉" text                                   -- unicode and an emoji
);
INSERT INTO "Weird ""Table"", with.dots" VALUES
  (1, 'one', 1, 'a.b', 'q"', 'UP', 'select *', 1, 2, 'ünï'),
  (2, 'two', -1, '', '', '', 'from', NULL, 0, '🎉'),
  (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);

CREATE TABLE "select" ("from" text PRIMARY KEY, "order" int, "group" text);  -- reserved words everywhere
INSERT INTO "select" VALUES
  ('where', 1, 'by'),
  ('order by', 2, NULL),
  ('limit', NULL, 'offset');

CREATE TABLE "Ünïcødé 表 🎉" ("ключ" text PRIMARY KEY, "値" int);  -- unicode table and columns
INSERT INTO "Ünïcødé 表 🎉" VALUES ('один', 1), ('два', 2), ('🎉', NULL);

-- --- keys ----------------------------------------------------------------------------------

CREATE TABLE t_text_keys (id text PRIMARY KEY, v int);
INSERT INTO t_text_keys VALUES
  (' a7', 1),                                          -- text key: leading space
  ('a7 ', 2),                                          -- text key: trailing space
  ('a7', 3),                                           -- text key: the same without spaces
  (' ', 4),                                            -- text key: one space
  ('  ', 5),                                           -- text key: two spaces
  ('', 6),                                             -- text key: empty string
  ('a,b', 7),                                          -- text key: comma
  ('(x)', 8),                                          -- text key: parentheses
  ('f(x,y)', 9),                                       -- text key: parentheses and a comma
  ('q"uote', 10),                                      -- text key: double quote
  ('"', 11),                                           -- text key: a lone double quote
  ('it''s', 12),                                       -- text key: single quote
  ('back\slash', 13),                                  -- text key: backslash
  ('\', 14),                                           -- text key: a lone backslash
  ('a.b', 15),                                         -- text key: dot
  ('NULL', 16),                                        -- text key: the word NULL
  ('null', 17),                                        -- text key: the word null
  ('*', 18),                                           -- text key: a star (like's wildcard)
  ('a%b_c', 19),                                       -- text key: LIKE wildcards
  (E'tab\there\nnewline', 20),                         -- text key: tab and newline
  ('ünï', 21),                                         -- text key: unicode
  ('🎉', 22),                                          -- text key: emoji
  ('A', 23), ('a', 24), ('B', 25), ('b', 26),          -- text keys: case
  ('or(a.eq.1)', 27),                                  -- text key: PostgREST logic syntax
  ('eq.5', 28),                                        -- text key: PostgREST operator syntax
  ('in.(1,2)', 29),                                    -- text key: PostgREST list syntax
  ('is.null', 30),                                     -- text key: PostgREST is syntax
  (repeat('long key ', 40), 31),                       -- text key: 360 characters
  ('&=?#+', 32);                                       -- text key: URL syntax

CREATE TABLE t_text_key_refs (id int PRIMARY KEY, key_ref text REFERENCES t_text_keys (id));
INSERT INTO t_text_key_refs VALUES
  (1, ' a7'),                                          -- text foreign key: leading space
  (2, 'a7'),                                           -- text foreign key
  (3, 'q"uote'),                                       -- text foreign key: a quote
  (4, ''),                                             -- text foreign key: empty string
  (5, NULL);                                           -- NULL foreign key

CREATE TABLE t_float_keys (k float8 PRIMARY KEY, note text);
INSERT INTO t_float_keys VALUES
  ('-0', 'negative zero'),                             -- float8 key -0 (0 itself excluded: equal to it)
  ('NaN', 'NaN'),                                      -- float8 key NaN
  ('Infinity', '+inf'),                                -- float8 key +Infinity
  ('-Infinity', '-inf'),                               -- float8 key -Infinity
  ('5e-324', 'smallest subnormal'),                    -- float8 key subnormal
  ('0.1', 'one tenth'),                                -- float8 key 0.1
  ('1e308', 'huge'),                                   -- float8 key 1e308
  ('-1e-300', 'tiny negative'),                        -- float8 key -1e-300
  ('1.5', 'one and a half');                           -- float8 key 1.5

CREATE TABLE t_numeric_keys (k numeric PRIMARY KEY, note text);
INSERT INTO t_numeric_keys VALUES
  ('1.50', 'trailing zero'),                           -- numeric key 1.50 (1.5 would be the same key)
  ('0.000', 'zero with scale'),                        -- numeric key 0.000
  ('12345678901234567890.123456789', 'long'),          -- numeric key beyond a double
  ('-1.5', 'negative'),                                -- numeric key negative
  ('NaN', 'NaN'),                                      -- numeric key NaN
  ('Infinity', '+inf'),                                -- numeric key +Infinity
  ('-Infinity', '-inf');                               -- numeric key -Infinity

CREATE TABLE t_uuid_keys (k uuid PRIMARY KEY, v int);
INSERT INTO t_uuid_keys VALUES
  ('00000000-0000-0000-0000-000000000000', 1),         -- uuid key: nil
  ('ffffffff-ffff-ffff-ffff-ffffffffffff', 2),         -- uuid key: max
  ('a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 3),         -- uuid key: v4
  ('7fffffff-ffff-ffff-ffff-ffffffffffff', 4),         -- uuid key: sorts in the middle
  ('80000000-0000-0000-0000-000000000000', 5);         -- uuid key: next to it

CREATE TABLE t_date_keys (k date PRIMARY KEY, v int);
INSERT INTO t_date_keys VALUES
  ('4714-11-24 BC', 1),                                -- date key: the earliest, BC
  ('0001-01-01 BC', 2),                                -- date key: 1 BC
  ('0001-01-01', 3),                                   -- date key: 1 AD
  ('2000-02-29', 4),                                   -- date key: leap day
  ('5874897-12-31', 5),                                -- date key: the latest
  ('infinity', 6),                                     -- date key: +infinity
  ('-infinity', 7);                                    -- date key: -infinity

CREATE TABLE t_serial_keys (id bigserial PRIMARY KEY, v text);
INSERT INTO t_serial_keys VALUES
  (1, 'first'),                                        -- bigserial key
  (9223372036854775807, 'max'),                        -- bigserial key: bigint max
  (-9223372036854775808, 'min');                       -- bigserial key: bigint min

CREATE TABLE t_composite_keys (
  "Tenant ID" text,                                    -- key column: space and uppercase
  "order" int,                                         -- key column: reserved word
  "a.b" date,                                          -- key column: a dot
  payload numeric,
  PRIMARY KEY ("Tenant ID", "order", "a.b"));
INSERT INTO t_composite_keys VALUES
  (' t1', 1, '2020-01-01', 1.50),                      -- composite key: leading space
  (' t1', 1, '2020-01-02', 2.50),                      -- composite key: differs in the last column
  (' t1', 2, '2020-01-01', NULL),                      -- composite key: differs in the middle column
  ('t,1', -1, '4714-11-24 BC', 0.10),                  -- composite key: comma, negative, BC date
  ('t"1', 0, 'infinity', 1.000),                       -- composite key: quote, infinity
  ('t1', 2147483647, '-infinity', 12345678901234567890.123456789),  -- composite key: int max
  ('(x)', 1, '2020-01-01', 1);                         -- composite key: parentheses

CREATE TABLE t_composite_key_children (
  id int PRIMARY KEY,
  "Tenant ID" text, "order" int, "a.b" date,
  FOREIGN KEY ("Tenant ID", "order", "a.b") REFERENCES t_composite_keys);  -- multi-column foreign key
INSERT INTO t_composite_key_children VALUES
  (1, ' t1', 1, '2020-01-02'),
  (2, 't,1', -1, '4714-11-24 BC'),
  (3, NULL, NULL, NULL);

CREATE TABLE t_collated_keys_c (k text COLLATE "C" PRIMARY KEY, v int);  -- text key COLLATE "C"
INSERT INTO t_collated_keys_c VALUES
  ('a', 1), ('B', 2), ('b', 3), ('A', 4), ('_', 5), ('ä', 6), ('Z', 7), ('1', 8), ('aa', 9),
  ('a-b', 10), ('ab', 11), ('Ä', 12), ('ß', 13), ('ss', 14), (' a', 15), ('a ', 16);

-- The same keys under a linguistic collation, where 'a' < 'B' < 'b' (under "C": 'B' < 'a'): the
-- first one this build has (ICU's root collation, else an OS locale), else the database's default.
DO $$
DECLARE
  candidate text;
  linguistic boolean;
  chosen text := 'default';
BEGIN
  FOREACH candidate IN ARRAY ARRAY['unicode', 'und-x-icu', 'en-x-icu', 'en_US.utf8', 'en_US.UTF-8',
                                   'en_US'] LOOP
    BEGIN
      EXECUTE format('SELECT %L::text COLLATE %I < %L::text COLLATE %I',
                     'a', candidate, 'B', candidate) INTO linguistic;
      IF linguistic THEN
        chosen := candidate;
        EXIT;
      END IF;
    EXCEPTION WHEN OTHERS THEN
      NULL;  -- not in this build
    END;
  END LOOP;
  EXECUTE format('CREATE TABLE t_collated_keys_locale (k text COLLATE %I PRIMARY KEY, v int)', chosen);
  EXECUTE format('COMMENT ON TABLE t_collated_keys_locale IS %L', 'text key COLLATE ' || chosen);
END $$;
INSERT INTO t_collated_keys_locale SELECT * FROM t_collated_keys_c;   -- text key, linguistic collation

-- A table without a primary key, every row several times; rows that sort the same on the
-- sortable columns (a, b, d) but differ in the json and point columns.
CREATE TABLE t_no_pk (a int, b text, c json, d float8, p point);
INSERT INTO t_no_pk
SELECT r.* FROM (VALUES
  (1, 'x', '{"v": 1}'::json, 1.5::float8, '(1,1)'::point),     -- duplicated row, json object
  (1, 'x', '{"v": 2}', 1.5, '(1,1)'),                          -- same sortable columns, other json
  (1, 'x', '{"v": 1}', 1.5, '(2,2)'),                          -- same sortable columns, other point
  (2, ' a7', '{"a" : 1.50}', '-0', NULL),                      -- text with a space, json with inner spaces, -0
  (NULL, NULL, NULL, NULL, NULL)                               -- all NULL
) AS r, generate_series(1, 2) AS copies;                       -- each row twice
-- (The six rows that tie in every sortable column (a, b, d) fit in one page of the test's row cap
-- of 7: a tie group larger than a page cannot be read exactly through the API, see SAFETY.md.)

-- A partitioned table: only the parent is a table of the API.
CREATE TABLE t_partitioned (id int PRIMARY KEY, region text, v numeric) PARTITION BY RANGE (id);
CREATE TABLE t_partitioned_low PARTITION OF t_partitioned FOR VALUES FROM (MINVALUE) TO (100);
CREATE TABLE t_partitioned_high PARTITION OF t_partitioned FOR VALUES FROM (100) TO (MAXVALUE);
INSERT INTO t_partitioned VALUES
  (1, 'low', 1.50), (2, 'low', NULL), (99, 'low edge', '0.10'),
  (100, 'high edge', 100.000), (150, 'high', 'NaN'), (2147483647, 'max', '-Infinity');

-- --- foreign-key cycles --------------------------------------------------------------------

-- A nullable DEFERRABLE cycle: a's rows refer to b's and b's to a's.
CREATE TABLE t_cycle_a (id int PRIMARY KEY, b_id int, label text);
CREATE TABLE t_cycle_b (id int PRIMARY KEY, a_id int, label text);
ALTER TABLE t_cycle_a ADD FOREIGN KEY (b_id) REFERENCES t_cycle_b DEFERRABLE INITIALLY DEFERRED;
ALTER TABLE t_cycle_b ADD FOREIGN KEY (a_id) REFERENCES t_cycle_a DEFERRABLE INITIALLY DEFERRED;
INSERT INTO t_cycle_a VALUES (1, NULL, 'a1 <-> b1'), (2, NULL, 'a2 -> b2 -> a1'), (3, NULL, 'a3 alone');
INSERT INTO t_cycle_b VALUES (1, 1, 'b1 <-> a1'), (2, 1, 'b2 -> a1'), (3, 3, 'b3 -> a3');
UPDATE t_cycle_a SET b_id = 1 WHERE id = 1;
UPDATE t_cycle_a SET b_id = 2 WHERE id = 2;

-- A 150-deep self-referencing chain whose children have the smaller keys (key order is child
-- first), plus a row that refers to itself.
CREATE TABLE t_chain (id int PRIMARY KEY, parent_id int REFERENCES t_chain (id), depth int);
INSERT INTO t_chain SELECT i, CASE WHEN i < 150 THEN i + 1 END, 150 - i FROM generate_series(1, 150) AS i;
INSERT INTO t_chain VALUES (1000, 1000, 0);            -- self-loop

-- A NOT NULL cycle: each row of x needs its row of y and the other way round, which only one
-- transaction can write (the API writes each request in its own): a restore must refuse it.
CREATE TABLE t_nn_cycle_x (id int PRIMARY KEY, y_id int NOT NULL);
CREATE TABLE t_nn_cycle_y (id int PRIMARY KEY, x_id int NOT NULL);
ALTER TABLE t_nn_cycle_x ADD FOREIGN KEY (y_id) REFERENCES t_nn_cycle_y DEFERRABLE INITIALLY DEFERRED;
ALTER TABLE t_nn_cycle_y ADD FOREIGN KEY (x_id) REFERENCES t_nn_cycle_x DEFERRABLE INITIALLY DEFERRED;
WITH x AS (INSERT INTO t_nn_cycle_x VALUES (1, 1), (2, 2) RETURNING id)
INSERT INTO t_nn_cycle_y SELECT id, id FROM x;
