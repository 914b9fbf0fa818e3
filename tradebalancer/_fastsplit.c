/*
 * tradebalancer._fastsplit: the balancer's per-event loop in C.
 *
 * Owns one thing: cutting a feed frame (a JSON array of objects) into its events' exact bytes
 * and appending each, behind its 4-byte little-endian length, to the chunk list of its pipe,
 * the pipe being the C original's (FNV-1a 64-bit of the route key, upper 32 bits, mod N).
 * split.py's Splitter calls it first and keeps every rule that is not about speed; see there.
 *
 * Router(pipes, route_keys, default_key, limit).route(frame, out) returns the number of events
 * routed, or -1 to decline, having appended nothing; the Python paths then decide. It declines,
 * so that what it accepts routes exactly as a JSON parser would and frames as the reader reads:
 *   - an event of limit bytes or more (reader/format.py LIMIT: the pipe format cannot carry it);
 *   - a frame with a byte over 0x7F (its keys would need UTF-8 validation);
 *   - anything but whitespace, '[', objects separated by ',', ']', whitespace;
 *   - an event whose "ev" is missing, not a string or "status", or whose route key member is
 *     missing or not a string (the Python slow path counts it as unkeyed);
 *   - a backslash in an event's member names, its type or its key (they would need decoding),
 *     a control byte in its key, or nesting deeper than MAX_DEPTH.
 *   - anything that is not valid JSON (RFC 8259): a frame is validated whole (valid_frame)
 *     before it is cut, so a broken number, literal, escape or control byte anywhere in it
 *     sends it to the Python path, which rejects it whole.
 * Names repeat as JSON parsers take them: the last value counts. Strings are skipped exactly
 * (escaped quotes included) once the frame is known to be valid.
 *
 * Two scanners: layout_event takes an event that starts as the feed writes it, {"ev":"T",
 * "sym":"...", and cuts the rest sixteen bytes at a step (SSE2; eight with plain integers
 * elsewhere), about 55 ns an event here; whatever it cannot prove it leaves to scan_event, a
 * token-by-token reader of any event, about three times slower.
 *
 * Each call appends at most one bytes object per pipe (all of that pipe's events of the frame,
 * each behind its length), so b"".join(out[pipe]) is what the pipe gets, as with split.py.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>
#include "_wsframe.h"
#ifdef __SSE2__
#include <immintrin.h>
#endif

#define FNV_OFFSET_BASIS 0xcbf29ce484222325ULL
#define FNV_PRIME 0x100000001b3ULL
#define MAX_DEPTH 64
#define DECLINE (-1)
#define FAILED (-2) /* a Python exception is set */

typedef struct {
    char *bytes;
    Py_ssize_t size;
} Name;

typedef struct {
    Name type;
    int key; /* index into Router.keys */
} TypeKey;

typedef struct {
    Py_ssize_t start; /* the event's '{' */
    Py_ssize_t end;   /* one past its '}' */
    uint32_t pipe;
} Event;

/* What the scan of one event found about a member it watches. */
typedef struct Found {
    Py_ssize_t start; /* the string's first byte, after the quote */
    Py_ssize_t size;
    int state; /* 0 absent, 1 a string, 2 another value, 3 a string with escapes */
} Found;

typedef struct {
    PyObject_HEAD
    uint32_t pipes;
    Name *keys; /* the distinct route key names; keys[default_key] for unlisted types */
    int key_count;
    int default_key;
    TypeKey *types;
    int type_count;
    Event *events; /* scratch, reused across calls */
    Py_ssize_t event_capacity;
    Py_ssize_t *pipe_bytes; /* scratch: per pipe, bytes of this frame */
    long long *pipe_events; /* per pipe, the events routed since the router was made */
    char **cursor;          /* scratch: per pipe, where the next event goes */
    PyObject **chunks;      /* scratch: per pipe, the bytes object being filled */
    Found *found;           /* scratch: per route key name, its value in this event */
    Py_ssize_t layout_events; /* events routed by layout_event, in frames that were routed */
    Py_ssize_t limit;         /* events must be shorter: the pipe format's LIMIT */
} Router;


static inline int is_space(unsigned char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/* The bytes that end a number or a literal (true, false, null). */
static const unsigned char ENDS_LITERAL[256] = {
    [' '] = 1, ['\t'] = 1, ['\n'] = 1, ['\r'] = 1, [','] = 1, ['}'] = 1,
    [']'] = 1, ['{'] = 1, ['['] = 1, ['"'] = 1,
};

static inline Py_ssize_t skip_space(const unsigned char *s, Py_ssize_t i, Py_ssize_t n)
{
    while (i < n && is_space(s[i]))
        i++;
    return i;
}

/*
 * Eight bytes at a time (SWAR): the feed's strings and numbers are a few bytes long, too short
 * for a memchr call to pay for itself, and a byte loop's exit is a branch the CPU mispredicts
 * once per token. Each mask has bit 7 of byte k set if byte k is a match; the lowest set bit is
 * the first match (the borrow that can set higher bits starts at a real match).
 */
#define ONES 0x0101010101010101ULL
#define HIGHS 0x8080808080808080ULL

static inline uint64_t load8(const unsigned char *p)
{
    uint64_t word;
    memcpy(&word, p, 8);
    return word; /* little-endian: byte k is bits 8k..8k+7 (x86-64, arm64, ...) */
}

static inline uint64_t zero_bytes(uint64_t word)
{
    return (word - ONES) & ~word & HIGHS;
}

/* Bytes that are a quote or a backslash. */
static inline uint64_t quote_or_backslash(uint64_t word)
{
    return zero_bytes(word ^ (ONES * '"')) | zero_bytes(word ^ (ONES * '\\'));
}

/* Bytes that are not a digit: bit 7 of (b + 0x46) is set for b > '9', of (b - 0x30) for b < '0',
 * of b itself for b > 0x7f (whose carry out reaches only the bytes after it). */
static inline uint64_t non_digits(uint64_t word)
{
    return ((word + ONES * 0x46) | (word - ONES * 0x30) | word) & HIGHS;
}

static inline Py_ssize_t first_byte(uint64_t mask)
{
    return __builtin_ctzll(mask) >> 3;
}

/*
 * s[i] is an opening quote: return the index of the closing one, or -1; set *escaped if the
 * string holds a backslash.
 */
static inline Py_ssize_t string_end(const unsigned char *s, Py_ssize_t i, Py_ssize_t n,
                                    int *escaped)
{
    Py_ssize_t j = i + 1;
    for (;;) {
        while (j + 8 <= n) {
            uint64_t mask = quote_or_backslash(load8(s + j));
            if (mask) {
                j += first_byte(mask);
                break;
            }
            j += 8;
        }
        while (j < n && s[j] != '"' && s[j] != '\\')
            j++;
        if (j >= n)
            return -1;
        if (s[j] == '"')
            return j;
        *escaped = 1;
        j += 2; /* the backslash and the byte it escapes, a quote perhaps */
    }
}

/* s[i] starts a number or a literal: return the index of the byte that ends it (or n). */
static inline Py_ssize_t literal_end(const unsigned char *s, Py_ssize_t i, Py_ssize_t n)
{
    for (;;) {
        while (i + 8 <= n) {
            uint64_t mask = non_digits(load8(s + i));
            if (mask) {
                i += first_byte(mask);
                break;
            }
            i += 8;
        }
        if (i >= n || ENDS_LITERAL[s[i]])
            return i;
        i++; /* '.', '-', 'e', a letter of true: not an end */
    }
}

/* s[i] opens an object or an array: return the index after its matching close, or -1. */
static Py_ssize_t nested_end(const unsigned char *s, Py_ssize_t i, Py_ssize_t n)
{
    unsigned char closers[MAX_DEPTH];
    int depth = 0;
    while (i < n) {
        unsigned char c = s[i];
        if (c == '"') {
            int escaped = 0;
            i = string_end(s, i, n, &escaped);
            if (i < 0)
                return -1;
        } else if (c == '{' || c == '[') {
            if (depth == MAX_DEPTH)
                return -1;
            closers[depth++] = c == '{' ? '}' : ']';
        } else if (c == '}' || c == ']') {
            if (depth == 0 || closers[--depth] != c)
                return -1;
            if (depth == 0)
                return i + 1;
        }
        i++;
    }
    return -1;
}

static inline int same(const unsigned char *s, Py_ssize_t start, Py_ssize_t size, const Name *name)
{
    /* the first byte inline: most names are one byte long, and so are most types */
    return size == name->size && (size == 0 || (s[start] == (unsigned char)name->bytes[0] &&
                                                 memcmp(s + start, name->bytes, (size_t)size) == 0));
}

/*
 * s[i] is an event's '{': scan its members, fill *ev and keys[] (Found per route key name),
 * return the index after its '}', or -1 to decline the frame.
 */
static Py_ssize_t scan_event(const Router *r, const unsigned char *s, Py_ssize_t i, Py_ssize_t n,
                             Found *ev, Found *keys)
{
    i = skip_space(s, i + 1, n);
    if (i < n && s[i] == '}')
        return i + 1;
    for (;;) {
        if (i >= n || s[i] != '"')
            return -1;
        int escaped = 0;
        Py_ssize_t name_end = string_end(s, i, n, &escaped);
        if (name_end < 0 || escaped)
            return -1;
        Py_ssize_t name_start = i + 1, name_size = name_end - name_start;
        Found *watched = NULL;
        if (name_size == 2 && s[name_start] == 'e' && s[name_start + 1] == 'v') {
            watched = ev;
        } else {
            for (int k = 0; k < r->key_count; k++) {
                if (same(s, name_start, name_size, &r->keys[k])) {
                    watched = &keys[k];
                    break;
                }
            }
        }
        i = skip_space(s, name_end + 1, n);
        if (i >= n || s[i] != ':')
            return -1;
        i = skip_space(s, i + 1, n);
        if (i >= n)
            return -1;
        unsigned char c = s[i];
        if (c == '"') {
            Py_ssize_t value_end = string_end(s, i, n, &escaped);
            if (value_end < 0)
                return -1;
            if (watched != NULL) {
                watched->start = i + 1;
                watched->size = value_end - i - 1;
                watched->state = escaped ? 3 : 1;
            }
            i = value_end + 1;
        } else {
            if (c == '{' || c == '[') {
                i = nested_end(s, i, n);
                if (i < 0)
                    return -1;
            } else {
                /* a number or a literal: up to the next delimiter (not validated) */
                Py_ssize_t literal = i;
                i = literal_end(s, i, n);
                if (i == literal)
                    return -1;
            }
            if (watched != NULL)
                watched->state = 2;
        }
        i = skip_space(s, i, n);
        if (i >= n)
            return -1;
        if (s[i] == '}')
            return i + 1;
        if (s[i] != ',')
            return -1;
        i = skip_space(s, i + 1, n);
    }
}

static inline uint32_t pipe_of(const Router *r, const unsigned char *key, Py_ssize_t size)
{
    uint64_t digest = FNV_OFFSET_BASIS;
    for (Py_ssize_t j = 0; j < size; j++) {
        digest ^= key[j];
        digest *= FNV_PRIME;
    }
    return (uint32_t)((digest >> 32) % r->pipes);
}

/* Return the index of the route key name for the event type s[start:start+size]. */
static inline int key_of(const Router *r, const unsigned char *s, Py_ssize_t start,
                         Py_ssize_t size)
{
    for (int t = 0; t < r->type_count; t++) {
        if (same(s, start, size, &r->types[t].type))
            return r->types[t].key;
    }
    return r->default_key;
}

static int add_event(Router *r, Py_ssize_t count, Py_ssize_t start, Py_ssize_t end, uint32_t pipe)
{
    if (count == r->event_capacity) {
        Py_ssize_t capacity = r->event_capacity ? r->event_capacity * 2 : 1024;
        Event *grown = PyMem_Realloc(r->events, (size_t)capacity * sizeof(Event));
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        r->events = grown;
        r->event_capacity = capacity;
    }
    r->events[count].start = start;
    r->events[count].end = end;
    r->events[count].pipe = pipe;
    return 0;
}

/* Exact byte masks (no borrow between bytes): bit 7 of byte k is set iff byte k is c. */
#define LOWS 0x7f7f7f7f7f7f7f7fULL

static inline uint64_t exact_equal(uint64_t word, unsigned char c)
{
    uint64_t x = word ^ (ONES * c);
    return ~(((x & LOWS) + LOWS) | x) & HIGHS;
}

/* Bit k of the result is bit 7 of byte k of mask. */
static inline unsigned compress(uint64_t mask)
{
    return (unsigned)(((mask >> 7) * 0x0102040810204080ULL) >> 56);
}

/* Bit k of the result: the parity of bits 0..k of bits (8 bits). */
static inline unsigned prefix_parity(unsigned bits)
{
    bits ^= bits << 1;
    bits ^= bits << 2;
    bits ^= bits << 4;
    return bits & 0xff;
}

/*
 * The feed's own layout, {"ev":"TYPE","KEY":"VALUE" and more members, eight bytes at a time
 * without a branch per token: return the index after the event's '}' and set *pipe, or 0 to
 * leave the event to scan_event. Past the key, with no backslash, every quote opens or closes
 * a string, so a word's in-string bytes are the prefix parity of its quotes; the first '}'
 * outside strings ends the event unless a '{' outside strings comes first (a nested object:
 * scan_event). A later member named "ev" or KEY would end in v" or in KEY's last byte and a
 * quote: any such pair, even inside a string, leaves the event to scan_event, so the head's
 * type and key are the only ones (JSON takes the last of a repeated name).
 */
static Py_ssize_t layout_event(const Router *r, const unsigned char *s, Py_ssize_t i,
                               Py_ssize_t n, uint32_t *pipe)
{
    if (n - i < 8 || memcmp(s + i, "{\"ev\":\"", 7) != 0)
        return 0;
    Py_ssize_t type = i + 7, j = type;
    while (j < n && s[j] != '"' && s[j] != '\\')
        j++;
    if (j >= n || s[j] != '"' || (j - type == 6 && memcmp(s + type, "status", 6) == 0))
        return 0;
    const Name *key = &r->keys[key_of(r, s, type, j - type)];
    j++; /* ","KEY":" */
    if (n - j < key->size + 6 || s[j] != ',' || s[j + 1] != '"' ||
        memcmp(s + j + 2, key->bytes, (size_t)key->size) != 0 || s[j + 2 + key->size] != '"' ||
        s[j + 3 + key->size] != ':' || s[j + 4 + key->size] != '"')
        return 0;
    Py_ssize_t value = j + 5 + key->size, v = value;
    while (v < n && s[v] != '"' && s[v] != '\\' && s[v] >= 0x20)
        v++;
    if (v >= n || s[v] != '"')
        return 0;
    *pipe = pipe_of(r, s + value, v - value);
    j = v + 1;
    if (j < n && s[j] == '}')
        return j + 1;
    if (j >= n || s[j] != ',')
        return 0;
    const unsigned char last = key->size ? (unsigned char)key->bytes[key->size - 1] : '"';
    int in_string = 0; /* whether the byte before j is in a string */
#ifdef __SSE2__
    /* Sixteen bytes a step: x86-64 always has SSE2. */
    const __m128i quote = _mm_set1_epi8('"'), backslash = _mm_set1_epi8('\\');
    const __m128i opening = _mm_set1_epi8('{'), closing = _mm_set1_epi8('}');
    const __m128i vee = _mm_set1_epi8('v'), final = _mm_set1_epi8((char)last);
    unsigned carry = 0;                               /* 0xffff: the byte before j is in a string */
    unsigned ended = s[j - 1] == 'v' || s[j - 1] == last; /* the byte before j ends a name */
    while (j + 16 <= n) {
        __m128i block = _mm_loadu_si128((const __m128i *)(s + j));
        unsigned quotes = (unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(block, quote));
        unsigned ends = (unsigned)_mm_movemask_epi8(
            _mm_or_si128(_mm_cmpeq_epi8(block, vee), _mm_cmpeq_epi8(block, final)));
        unsigned escapes = (unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(block, backslash));
        unsigned in = quotes;
        in ^= in << 1;
        in ^= in << 2;
        in ^= in << 4;
        in ^= in << 8;
        in = (in ^ carry) & 0xffff;
        unsigned closes = (unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(block, closing)) & ~in;
        unsigned braces = closes | ((unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(block, opening)) & ~in);
        /* Only the bytes up to the first brace are this event's (the next one's "ev" follows). A
         * backslash among them makes the parity wrong, and the event is left to scan_event; one
         * after the brace does not change the parity before it. */
        unsigned ours = braces ? (braces & -braces) - 1 : 0xffff;
        if ((escapes | (((ends << 1) | ended) & quotes)) & ours)
            return 0;
        if (braces)
            return (braces & closes & -braces) ? j + __builtin_ctz(braces) + 1 : 0;
        carry = (in & 0x8000) ? 0xffff : 0;
        ended = (ends >> 15) & 1;
        j += 16;
    }
    in_string = carry != 0;
#else
    unsigned inside = 0;           /* 0xff if the byte before j is in a string */
    unsigned char previous = '"'; /* the byte before j */
    while (j + 8 <= n) {
        uint64_t word = load8(s + j);
        unsigned quotes = compress(exact_equal(word, '"'));
        unsigned ends = compress(exact_equal(word, 'v') | exact_equal(word, last));
        unsigned ended = previous == 'v' || previous == last;
        unsigned escapes = compress(exact_equal(word, '\\'));
        unsigned in = prefix_parity(quotes) ^ inside;
        unsigned closes = compress(exact_equal(word, '}')) & ~in & 0xff;
        unsigned braces = closes | (compress(exact_equal(word, '{')) & ~in & 0xff);
        unsigned ours = braces ? (braces & -braces) - 1 : 0xff; /* as in the SSE2 loop */
        if ((escapes | (((ends << 1) | ended) & quotes)) & ours)
            return 0;
        if (braces)
            return (braces & closes & -braces) ? j + __builtin_ctz(braces) + 1 : 0;
        inside = (in & 0x80) ? 0xff : 0;
        previous = s[j + 7];
        j += 8;
    }
    in_string = inside != 0;
#endif
    for (unsigned char previous = s[j - 1]; j < n; j++) {
        unsigned char c = s[j];
        if (c == '\\' || (c == '"' && (previous == 'v' || previous == last)))
            return 0;
        if (c == '"')
            in_string = !in_string;
        else if (!in_string && c == '{')
            return 0;
        else if (!in_string && c == '}')
            return j + 1;
        previous = c;
    }
    return 0;
}

/* Any event scan_event can read: return the index after its '}' and set *pipe, or -1. */
static Py_ssize_t general_event(Router *r, const unsigned char *s, Py_ssize_t i, Py_ssize_t n,
                                uint32_t *pipe)
{
    Found *keys = r->found;
    Found ev = {0, 0, 0};
    memset(keys, 0, sizeof(Found) * (size_t)r->key_count);
    Py_ssize_t end = scan_event(r, s, i, n, &ev, keys);
    if (end < 0 || ev.state != 1)
        return -1;
    if (ev.size == 6 && memcmp(s + ev.start, "status", 6) == 0)
        return -1;
    const Found *key = &keys[key_of(r, s, ev.start, ev.size)];
    if (key->state != 1)
        return -1;
    for (Py_ssize_t j = key->start; j < key->start + key->size; j++) {
        if (s[j] < 0x20)
            return -1;
    }
    *pipe = pipe_of(r, s + key->start, key->size);
    return end;
}

/*
 * Validation: the whole frame, before it is cut, against RFC 8259's grammar, ASCII only (the
 * Python path validates UTF-8). Nothing that is not valid JSON may reach a worker: a number like
 * 18x7, a literal like tru, a trailing comma, a control byte in a string, an unknown escape, NaN:
 * the frame is declined, and the Python path rejects it whole. Two readers give the same
 * answers: valid_blocks (SSE2) takes frames laid out as the feed writes them, sixty-four bytes
 * a step, and leaves any other to valid_json, token by token. Either returns 1 if s[0:n] is one
 * JSON value with only whitespace around it.
 */

static const unsigned char ESCAPED[256] = {
    ['"'] = 1, ['\\'] = 1, ['/'] = 1, ['b'] = 1, ['f'] = 1, ['n'] = 1, ['r'] = 1, ['t'] = 1,
};

static inline int is_hex(unsigned char c)
{
    return (c >= '0' && c <= '9') || ((c | 0x20) >= 'a' && (c | 0x20) <= 'f');
}

static inline int hex_value(unsigned char c) /* c is a hex digit */
{
    return c <= '9' ? c - '0' : (c | 0x20) - 'a' + 10;
}

/* A quote, a backslash, a control byte or one over 0x7f. (Written as a test of one byte, which
 * gcc makes a range compare; inline in the loop's condition, measured 15% slower.) */
static inline int stops_string(unsigned char c)
{
    return c == '"' || c == '\\' || c < 0x20 || c > 0x7f;
}

/*
 * s[i] is an opening quote: return the index after the closing one, or -1 if invalid. A byte
 * at a time: the feed's strings are a few bytes long, and the loop's exit is a branch the CPU
 * predicts, where a SWAR step puts a load, its mask and a count of trailing zeros between one
 * token and the next (measured: a fifth slower). A byte over 0x7f stops it as a control byte
 * does, which makes this pass the frame's ASCII check too: outside strings the grammar takes
 * ASCII bytes only.
 */
static inline Py_ssize_t valid_string(const unsigned char *s, Py_ssize_t i, Py_ssize_t n)
{
    Py_ssize_t j = i + 1;
    for (;;) {
        while (j < n && !stops_string(s[j]))
            j++;
        if (j >= n)
            return -1;
        if (s[j] == '"')
            return j + 1;
        if (s[j] != '\\')
            return -1; /* a control byte, or not ASCII */
        /* one of \" \\ \/ \b \f \n \r \t, or \u and four hex digits */
        if (j + 1 >= n)
            return -1;
        unsigned char e = s[j + 1];
        if (ESCAPED[e]) {
            j += 2;
        } else if (e == 'u' && j + 5 < n && is_hex(s[j + 2]) && is_hex(s[j + 3]) &&
                   is_hex(s[j + 4]) && is_hex(s[j + 5])) {
            /* \uD800-\uDFFF: surrogates, which must pair up; orjson checks that, so the frame
             * goes to the Python path (they never occur in the feed: it sends plain ASCII) */
            if (hex_value(s[j + 2]) == 0xd && hex_value(s[j + 3]) >= 8)
                return -1;
            j += 6;
        } else {
            return -1;
        }
    }
}

static inline int is_digit(unsigned char c)
{
    return c >= '0' && c <= '9';
}

/* Return the index of the first byte from i on that is not a digit, or n. Eight bytes a step:
 * unlike its strings' lengths, the feed's digit runs vary (1 to 14 digits) and a byte loop's
 * exit is mispredicted (measured: a sixth slower). */
static inline Py_ssize_t digits_end(const unsigned char *s, Py_ssize_t i, Py_ssize_t n)
{
    for (; i + 8 <= n; i += 8) {
        uint64_t others = non_digits(load8(s + i));
        if (others)
            return i + first_byte(others);
    }
    while (i < n && is_digit(s[i]))
        i++;
    return i;
}

/*
 * s[i] starts a number with an exponent, valid up to its 'e' (valid_number has read that far):
 * return the index after it, or -1, as valid_number does. The exponent can take any number to
 * 1e308 or past it, or back, so this reading tracks the decimal exponent of the leading digit;
 * the feed never sends one.
 */
static Py_ssize_t valid_exponent_number(const unsigned char *s, Py_ssize_t i, Py_ssize_t n)
{
    Py_ssize_t digits = 0, zeros = 0; /* integer digits; the fraction's leading zeros if 0.xxx */
    int nonzero = 0;
    if (s[i] == '-')
        i++;
    if (s[i] == '0') {
        i++;
    } else {
        Py_ssize_t start = i;
        while (++i < n && is_digit(s[i]))
            ;
        digits = i - start;
        nonzero = 1;
    }
    if (s[i] == '.') {
        for (i++; i < n && is_digit(s[i]); i++) {
            if (!nonzero && s[i] == '0')
                zeros++;
            else
                nonzero = 1;
        }
    }
    int negative = 0;
    long exponent = 0;
    if (++i < n && (s[i] == '+' || s[i] == '-'))
        negative = s[i++] == '-';
    if (i >= n || !is_digit(s[i]))
        return -1;
    for (; i < n && is_digit(s[i]); i++) {
        if (exponent < 100000)
            exponent = exponent * 10 + (s[i] - '0');
    }
    if (negative)
        exponent = -exponent;
    /* The decimal exponent of the leading digit: below 308 the value is below DBL_MAX. */
    long magnitude = digits ? (long)digits - 1 + exponent : exponent - (long)zeros - 1;
    if (nonzero && magnitude >= 308)
        return -1;
    return i;
}

/*
 * s[i] (i < n) starts a number: return the index after it, or -1 (RFC 8259 section 6). Also -1,
 * for the Python path to decide with orjson, for a number whose magnitude reaches 1e308: past
 * DBL_MAX it is infinity as a double, which orjson refuses, and "the C router changes speed,
 * never results" (I-JSON, RFC 7493 2.2, keeps numbers within a double's range too). Without an
 * exponent, that is 309 integer digits or more.
 */
static inline Py_ssize_t valid_number(const unsigned char *s, Py_ssize_t i, Py_ssize_t n)
{
    Py_ssize_t start = i;
    if (s[i] == '-' && ++i >= n)
        return -1;
    Py_ssize_t integer = i;
    i = digits_end(s, i, n);
    /* no digit, or a leading zero (a digit after a number's 0 is invalid wherever it is) */
    if (i == integer || (s[integer] == '0' && i > integer + 1))
        return -1;
    Py_ssize_t digits = i - integer;
    if (i < n && s[i] == '.') {
        Py_ssize_t fraction = i + 1;
        i = digits_end(s, fraction, n);
        if (i == fraction)
            return -1;
    }
    if (i < n && (s[i] == 'e' || s[i] == 'E'))
        return valid_exponent_number(s, start, n);
    return digits >= 309 ? -1 : i;
}

static inline Py_ssize_t valid_literal(const unsigned char *s, Py_ssize_t i, Py_ssize_t n)
{
    static const char *const literals[] = {"true", "false", "null"};
    for (int k = 0; k < 3; k++) {
        size_t size = strlen(literals[k]);
        if ((Py_ssize_t)size <= n - i && memcmp(s + i, literals[k], size) == 0)
            return i + (Py_ssize_t)size;
    }
    return -1;
}

/* Any frame, token by token. */
static int valid_json(const unsigned char *s, Py_ssize_t n)
{
    /* '{' or '[' per level: the frame's array and an event's object, then MAX_DEPTH inside */
    unsigned char open[MAX_DEPTH + 2];
    int depth = 0;
    Py_ssize_t i = skip_space(s, 0, n);
    for (;;) {
        /* a value at s[i] */
        if (i >= n)
            return 0;
        unsigned char c = s[i];
        if (c == '{' || c == '[') {
            if (depth == MAX_DEPTH + 2)
                return 0;
            open[depth++] = c;
            i = skip_space(s, i + 1, n);
            if (i < n && s[i] == (c == '{' ? '}' : ']')) {
                depth--;
                i++;
                goto after_value;
            }
            if (c == '{')
                goto member_name;
            continue;
        }
        if (c == '"')
            i = valid_string(s, i, n);
        else if (c == '-' || is_digit(c))
            i = valid_number(s, i, n);
        else
            i = valid_literal(s, i, n);
        if (i < 0)
            return 0;
    after_value:
        i = skip_space(s, i, n);
        if (depth == 0)
            return i == n;
        if (i >= n)
            return 0;
        if (s[i] == ',') {
            i = skip_space(s, i + 1, n);
            if (open[depth - 1] == '{')
                goto member_name;
            continue;
        }
        if (s[i] != (open[depth - 1] == '{' ? '}' : ']'))
            return 0;
        depth--;
        i++;
        goto after_value;
    member_name:
        if (i >= n || s[i] != '"')
            return 0;
        i = valid_string(s, i, n);
        if (i < 0)
            return 0;
        i = skip_space(s, i, n);
        if (i >= n || s[i] != ':')
            return 0;
        i = skip_space(s, i + 1, n);
    }
}

#ifdef __SSE2__
/*
 * The feed's frames, sixty-four bytes a step: token by token, each string and number is a load
 * and a branch on the path to the next token, about 3 ns a token here. Here each byte class is
 * a 64-bit mask (bit k: byte k of the block), from SSE2 compares, and the grammar is checked as
 * relations between each byte and the one before it, over the whole block at once; a loop runs
 * only over the brackets. That takes what the feed writes: no whitespace, no backslash (so
 * every quote opens or closes a string), numbers without exponents, no literals, an array or an
 * object outside. Anything else returns 0, for valid_json to decide: this returns 1 only for
 * valid JSON, and 0 never rejects, so only its acceptances need to agree with valid_json.
 */

/* Bit k of each mask: whether byte k of the block is... */
typedef struct {
    uint64_t quote;
    uint64_t bad;     /* a backslash, whitespace, a control byte or a byte over 0x7f */
    uint64_t bracket; /* '{', '}', '[' or ']'; also 'Y', '_', 'y' and 0x7f, which break the walk */
    uint64_t colon, comma, digit, minus, dot, zero;
} Classes;

static inline uint64_t movemask64(__m128i m0, __m128i m1, __m128i m2, __m128i m3)
{
    return (uint64_t)(unsigned)_mm_movemask_epi8(m0) |
           (uint64_t)(unsigned)_mm_movemask_epi8(m1) << 16 |
           (uint64_t)(unsigned)_mm_movemask_epi8(m2) << 32 |
           (uint64_t)(unsigned)_mm_movemask_epi8(m3) << 48;
}

static inline void classify(const unsigned char *p, Classes *c)
{
    const __m128i b0 = _mm_loadu_si128((const __m128i *)p);
    const __m128i b1 = _mm_loadu_si128((const __m128i *)(p + 16));
    const __m128i b2 = _mm_loadu_si128((const __m128i *)(p + 32));
    const __m128i b3 = _mm_loadu_si128((const __m128i *)(p + 48));
#define CLASS(test) movemask64(test(b0), test(b1), test(b2), test(b3))
    /* signed: a byte over 0x7f is below '!' too */
#define BAD(b) _mm_or_si128(_mm_cmpeq_epi8(b, _mm_set1_epi8('\\')), \
                            _mm_cmplt_epi8(b, _mm_set1_epi8('!')))
    /* '{' 0x7b, '}' 0x7d, '[' 0x5b and ']' 0x5d differ only in bits 1, 2 and 5 */
#define BRACKET(b) _mm_cmpeq_epi8(_mm_or_si128(b, _mm_set1_epi8(0x26)), _mm_set1_epi8(0x7f))
    /* one signed compare: '0'..'9' moved to the bottom, -128..-119 */
#define DIGIT(b) _mm_cmplt_epi8(_mm_add_epi8(b, _mm_set1_epi8((char)(0x80 - '0'))), \
                               _mm_set1_epi8((char)(0x80 + 10)))
#define QUOTE(b) _mm_cmpeq_epi8(b, _mm_set1_epi8('"'))
#define COLON(b) _mm_cmpeq_epi8(b, _mm_set1_epi8(':'))
#define COMMA(b) _mm_cmpeq_epi8(b, _mm_set1_epi8(','))
#define MINUS(b) _mm_cmpeq_epi8(b, _mm_set1_epi8('-'))
#define DOT(b) _mm_cmpeq_epi8(b, _mm_set1_epi8('.'))
#define ZERO(b) _mm_cmpeq_epi8(b, _mm_set1_epi8('0'))
    c->quote = CLASS(QUOTE);
    c->bad = CLASS(BAD);
    c->bracket = CLASS(BRACKET);
    c->colon = CLASS(COLON);
    c->comma = CLASS(COMMA);
    c->digit = CLASS(DIGIT);
    c->minus = CLASS(MINUS);
    c->dot = CLASS(DOT);
    c->zero = CLASS(ZERO);
#undef CLASS
#undef BAD
#undef BRACKET
#undef DIGIT
#undef QUOTE
#undef COLON
#undef COMMA
#undef MINUS
#undef DOT
#undef ZERO
}

/* Bit k of the result: the parity of bits 0..k of bits. */
static inline uint64_t prefix_xor(uint64_t bits)
{
    bits ^= bits << 1;
    bits ^= bits << 2;
    bits ^= bits << 4;
    bits ^= bits << 8;
    bits ^= bits << 16;
    bits ^= bits << 32;
    return bits;
}

/* a + b + *carry, and the carry out: a run of a's bits seeded by b's bit at its start carries
 * to the bit after the run, across blocks too */
static inline uint64_t add_carry(uint64_t a, uint64_t b, uint64_t *carry)
{
    uint64_t sum = a + b, total = sum + *carry;
    *carry = (sum < a) | (total < sum);
    return total;
}

/* For a mask variable m, the mask "the byte before is in m": m shifted up a byte, and below it
 * the last byte of the block before, from m_last. */
#define BEFORE(m) (((m) << 1) | (m##_last >> 63))

typedef void (*Classify)(const unsigned char *, Classes *);

/* The body of valid_blocks, inlined into each of its two builds with their classify. */
static inline __attribute__((always_inline)) int blocks(const unsigned char *s, Py_ssize_t n,
                                                        Classify classify)
{
    if (n < 2 || (s[0] != '[' && s[0] != '{'))
        return 0;
    unsigned char open[MAX_DEPTH + 2]; /* as in valid_json */
    int depth = 0, object = 0;         /* object: whether the innermost container is one */
    uint64_t in_string = 0;            /* all ones: the block before ended in a string */
    uint64_t key_carry = 0, dot_carry = 0;
    /* the masks of the block before; value_last as if a ':' came before the frame */
    uint64_t scalar_last = 0, digit_last = 0, minus_last = 0, marks_last = 0, lead_last = 0;
    uint64_t any_last = 0, value_last = 1ULL << 63, key_last = 0, key_end_last = 0,
             end_last = 0, closable_last = 0;
    for (Py_ssize_t base = 0; base < n; base += 64) {
        const unsigned char *p = s + base;
        uint64_t within = ~0ULL; /* the block's bytes that are the frame's: all but at its end */
        unsigned char tail[64];
        if (n - base < 64) {
            memset(tail, 0, sizeof tail);
            memcpy(tail, p, (size_t)(n - base));
            p = tail;
            within = (1ULL << (n - base)) - 1;
        }
        Classes c;
        classify(p, &c);
        if (c.bad & within)
            return 0;
        /* in a string: from its opening quote up to, not with, its closing one */
        uint64_t string = prefix_xor(c.quote) ^ in_string;
        in_string = 0 - (string >> 63);
        uint64_t out = ~(string | c.quote) & within; /* outside strings */
        uint64_t colon = c.colon & out, comma = c.comma & out;
        /* The brackets in order: nesting and matching, and which bytes are in an object (with
         * each bracket, the container it opens, or the one it returns to). */
        uint64_t opens = 0, closes = 0, in_object = 0;
        int from = 0;
        for (uint64_t m = c.bracket & out; m; m &= m - 1) {
            int k = __builtin_ctzll(m);
            if (object)
                in_object |= (~0ULL << from) & ((1ULL << k) - 1);
            from = k;
            unsigned char b = p[k];
            if (b == '{' || b == '[') {
                if (depth == MAX_DEPTH + 2)
                    return 0;
                open[depth++] = b;
                object = b == '{';
                opens |= m & -m;
            } else {
                /* '}' - 2 is '{' and ']' - 2 is '['; Y, _, y and 0x7f match nothing */
                if (depth == 0 || open[--depth] != b - 2)
                    return 0;
                if (depth == 0 && base + k != n - 1)
                    return 0; /* the frame's array or object ends before the frame */
                object = depth && open[depth - 1] == '{';
                closes |= m & -m;
            }
        }
        if (object)
            in_object |= ~0ULL << from;
        /* Numbers: -, digits, . and digits. Not a letter or a '+' (to valid_json), nor a block
         * of number bytes: 309 digits, which reach 1e308, fill at least one. */
        uint64_t scalar = out & ~(opens | closes | colon | comma);
        if ((scalar & ~(c.digit | c.minus | c.dot)) || scalar == ~0ULL)
            return 0;
        uint64_t digit = c.digit & out, minus = c.minus & out, point = c.dot & out;
        uint64_t marks = minus | point;
        /* a minus only first; a digit after a minus or a point; a point after a digit; one
         * point a number (a second is reached by the carry from the first); no digit after a
         * leading zero */
        uint64_t errors = minus & BEFORE(scalar);
        errors |= BEFORE(marks) & ~digit;
        errors |= point & ~BEFORE(digit);
        errors |= add_carry(scalar, point, &dot_carry) & point;
        uint64_t lead = c.zero & out & (~BEFORE(scalar) | BEFORE(minus));
        errors |= BEFORE(lead) & digit;
        /* Each token after the one before it (there is no whitespace): where a string may
         * start, a value, a member name (in an object, after '{' or ','); a name's closing
         * quote is where the carry from its opening quote leaves the string. */
        uint64_t opening = c.quote & string, closing = c.quote & ~string;
        uint64_t any = opens | colon | comma;
        uint64_t value = colon | ((opens | comma) & ~in_object);
        uint64_t key = (opens | comma) & in_object;
        uint64_t key_end = add_carry(string, opening & BEFORE(key), &key_carry) & ~string;
        uint64_t end = (closing & ~key_end) | closes | scalar; /* a value's last byte */
        uint64_t closable = end | opens;                       /* before a ']' or '}' */
        uint64_t starts = opens | (scalar & ~BEFORE(scalar));
        errors |= opening & ~BEFORE(any);
        errors |= starts & ~BEFORE(value);
        errors |= colon & ~BEFORE(key_end);
        errors |= comma & ~BEFORE(end);
        errors |= closes & ~BEFORE(closable);
        if (errors)
            return 0;
        scalar_last = scalar, digit_last = digit, minus_last = minus, marks_last = marks;
        lead_last = lead;
        any_last = any, value_last = value, key_last = key, key_end_last = key_end;
        end_last = end, closable_last = closable;
    }
    return depth == 0;
}
#undef BEFORE

/* The same classes from two 32-byte loads: half the compares and masks of SSE2's four. */
static inline __attribute__((always_inline, target("avx2"))) void
classify_avx2(const unsigned char *p, Classes *c)
{
    const __m256i lo = _mm256_loadu_si256((const __m256i *)p);
    const __m256i hi = _mm256_loadu_si256((const __m256i *)(p + 32));
#define CLASS(test) ((uint64_t)(uint32_t)_mm256_movemask_epi8(test(lo)) | \
                     (uint64_t)(uint32_t)_mm256_movemask_epi8(test(hi)) << 32)
#define BAD(b) _mm256_or_si256(_mm256_cmpeq_epi8(b, _mm256_set1_epi8('\\')), \
                               _mm256_cmpgt_epi8(_mm256_set1_epi8('!'), b))
#define BRACKET(b) _mm256_cmpeq_epi8(_mm256_or_si256(b, _mm256_set1_epi8(0x26)), \
                                     _mm256_set1_epi8(0x7f))
#define DIGIT(b) _mm256_cmpgt_epi8(_mm256_set1_epi8((char)(0x80 + 10)), \
                                   _mm256_add_epi8(b, _mm256_set1_epi8((char)(0x80 - '0'))))
#define IS(ch) _mm256_cmpeq_epi8(b, _mm256_set1_epi8(ch))
#define QUOTE(b) _mm256_cmpeq_epi8(b, _mm256_set1_epi8('"'))
#define COLON(b) _mm256_cmpeq_epi8(b, _mm256_set1_epi8(':'))
#define COMMA(b) _mm256_cmpeq_epi8(b, _mm256_set1_epi8(','))
#define MINUS(b) _mm256_cmpeq_epi8(b, _mm256_set1_epi8('-'))
#define DOT(b) _mm256_cmpeq_epi8(b, _mm256_set1_epi8('.'))
#define ZERO(b) _mm256_cmpeq_epi8(b, _mm256_set1_epi8('0'))
    c->quote = CLASS(QUOTE);
    c->bad = CLASS(BAD);
    c->bracket = CLASS(BRACKET);
    c->colon = CLASS(COLON);
    c->comma = CLASS(COMMA);
    c->digit = CLASS(DIGIT);
    c->minus = CLASS(MINUS);
    c->dot = CLASS(DOT);
    c->zero = CLASS(ZERO);
#undef CLASS
#undef BAD
#undef BRACKET
#undef DIGIT
#undef IS
#undef QUOTE
#undef COLON
#undef COMMA
#undef MINUS
#undef DOT
#undef ZERO
}

static int valid_blocks_sse2(const unsigned char *s, Py_ssize_t n)
{
    return blocks(s, n, classify);
}

static __attribute__((target("avx2"))) int valid_blocks_avx2(const unsigned char *s,
                                                              Py_ssize_t n)
{
    return blocks(s, n, classify_avx2);
}

/* valid_blocks: the AVX2 build where the CPU has it (x86-64-v3 and later), else SSE2's. */
static int (*valid_blocks)(const unsigned char *, Py_ssize_t) = valid_blocks_sse2;
#endif

/* The frame's check: ASCII and valid JSON. */
static int valid_frame(const unsigned char *s, Py_ssize_t n)
{
#ifdef __SSE2__
    if (valid_blocks(s, n))
        return 1;
#endif
    return valid_json(s, n);
}

/* Find the events of the frame s[start:n] into r->events from index first; return their count,
   DECLINE or FAILED. Offsets are into s. */
static Py_ssize_t scan_frame(Router *r, const unsigned char *s, Py_ssize_t start, Py_ssize_t n,
                             Py_ssize_t first)
{
    if (!valid_frame(s + start, n - start))
        return DECLINE;
    Py_ssize_t count = first, layout = 0;
    Py_ssize_t i = skip_space(s, start, n);
    if (i >= n || s[i] != '[')
        return DECLINE;
    i = skip_space(s, i + 1, n);
    if (i < n && s[i] == ']')
        return skip_space(s, i + 1, n) == n ? 0 : DECLINE;
    for (;;) {
        if (i >= n || s[i] != '{')
            return DECLINE;
        uint32_t pipe = 0;
        Py_ssize_t end = layout_event(r, s, i, n, &pipe);
        if (end == 0)
            end = general_event(r, s, i, n, &pipe);
        else
            layout++;
        if (end < 0 || end - i >= r->limit)
            return DECLINE;
        if (add_event(r, count, i, end, pipe) < 0)
            return FAILED;
        count++;
        i = skip_space(s, end, n);
        if (i >= n)
            return DECLINE;
        if (s[i] == ']')
            break;
        if (s[i] != ',')
            return DECLINE;
        i = skip_space(s, i + 1, n);
    }
    if (skip_space(s, i + 1, n) != n)
        return DECLINE;
    r->layout_events += layout;
    return count - first;
}

/* Append r->events[0:count], each behind its length, to out: one bytes object per pipe. */
static int emit(Router *r, const unsigned char *s, Py_ssize_t count, PyObject *out)
{
    memset(r->pipe_bytes, 0, sizeof(Py_ssize_t) * r->pipes);
    for (Py_ssize_t e = 0; e < count; e++) {
        const Event *event = &r->events[e];
        r->pipe_bytes[event->pipe] += 4 + (event->end - event->start);
    }
    /* Allocate every chunk first, so that a failure leaves out untouched. */
    PyObject **chunks = r->chunks;
    for (uint32_t p = 0; p < r->pipes; p++) {
        chunks[p] = NULL;
        if (r->pipe_bytes[p] == 0)
            continue;
        chunks[p] = PyBytes_FromStringAndSize(NULL, r->pipe_bytes[p]);
        if (chunks[p] == NULL) {
            for (uint32_t q = 0; q < p; q++)
                Py_XDECREF(chunks[q]);
            return -1;
        }
        r->cursor[p] = PyBytes_AS_STRING(chunks[p]);
    }
    for (Py_ssize_t e = 0; e < count; e++) {
        const Event *event = &r->events[e];
        uint32_t size = (uint32_t)(event->end - event->start);
        char *to = r->cursor[event->pipe];
        to[0] = (char)(size & 0xff);
        to[1] = (char)((size >> 8) & 0xff);
        to[2] = (char)((size >> 16) & 0xff);
        to[3] = (char)(size >> 24);
        memcpy(to + 4, s + event->start, size);
        r->cursor[event->pipe] = to + 4 + size;
        r->pipe_events[event->pipe]++;
    }
    int failed = 0;
    for (uint32_t p = 0; p < r->pipes; p++) {
        if (chunks[p] == NULL)
            continue;
        /* PyList_Append only fails without memory; the chunks after it are dropped. */
        if (!failed && PyList_Append(PyList_GET_ITEM(out, p), chunks[p]) < 0)
            failed = 1;
        Py_DECREF(chunks[p]);
    }
    return failed ? -1 : 0;
}

static int check_out(Router *r, PyObject *out)
{
    if (!PyList_Check(out) || PyList_GET_SIZE(out) != (Py_ssize_t)r->pipes) {
        PyErr_Format(PyExc_ValueError, "out must be a list of one list per pipe (%u)", r->pipes);
        return -1;
    }
    for (uint32_t p = 0; p < r->pipes; p++) {
        if (!PyList_Check(PyList_GET_ITEM(out, p))) {
            PyErr_SetString(PyExc_TypeError, "out must hold lists");
            return -1;
        }
    }
    return 0;
}

static PyObject *Router_route(Router *r, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "route(frame, out) takes two arguments");
        return NULL;
    }
    PyObject *out = args[1];
    if (check_out(r, out) < 0)
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *s = view.buf;
    Py_ssize_t count = scan_frame(r, s, 0, view.len, 0);
    if (count < 0) {
        PyBuffer_Release(&view);
        return count == FAILED ? NULL : PyLong_FromLong(-1);
    }
    int failed = emit(r, s, count, out);
    PyBuffer_Release(&view);
    return failed ? NULL : PyLong_FromSsize_t(count);
}

/*
 * The t of a frame's last event, as delay.py's event_time reads it (the reference): the last
 * "t": in the frame's last TAIL bytes, then digits between optional whitespace, ended by ','
 * or '}' within NUMBER bytes of the colon; nanoseconds, microseconds, milliseconds and seconds
 * told apart by size. 0.0 when there is none.
 */
#define STAMP_TAIL 512
#define STAMP_NUMBER 24

static double frame_time(const unsigned char *s, Py_ssize_t start, Py_ssize_t n)
{
    Py_ssize_t from = n - start > STAMP_TAIL ? n - STAMP_TAIL : start;
    Py_ssize_t at = -1;
    for (Py_ssize_t j = n - 4; j >= from; j--) {
        if (s[j] == '"' && s[j + 1] == 't' && s[j + 2] == '"' && s[j + 3] == ':') {
            at = j + 4;
            break;
        }
    }
    if (at < 0)
        return 0.0;
    Py_ssize_t limit = at + STAMP_NUMBER < n ? at + STAMP_NUMBER : n, i = at;
    while (i < limit && is_space(s[i]))
        i++;
    uint64_t value = 0;
    int digits = 0;
    while (i < limit && s[i] >= '0' && s[i] <= '9') {
        if (++digits > 19)
            return 0.0;
        value = value * 10 + (uint64_t)(s[i++] - '0');
    }
    while (i < limit && is_space(s[i]))
        i++;
    if (digits == 0 || i >= limit || (s[i] != ',' && s[i] != '}'))
        return 0.0;
    if (value >= 100000000000000000ULL)
        return (double)value / 1e9;
    if (value >= 100000000000000ULL)
        return (double)value / 1e6;
    if (value >= 100000000000ULL)
        return (double)value / 1e3;
    return value >= 1000000000ULL ? (double)value : 0.0;
}

/* route_frames(buffer, start, max_size, out, stamps) -> (end, frames, events) */
static PyObject *Router_route_frames(Router *r, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError,
                        "route_frames(buffer, start, max_size, out, stamps) takes five arguments");
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[1]), max_size = PyLong_AsSsize_t(args[2]);
    if ((start == -1 || max_size == -1) && PyErr_Occurred())
        return NULL;
    PyObject *out = args[3], *stamps = args[4];
    if (check_out(r, out) < 0)
        return NULL;
    if (!PyList_Check(stamps)) {
        PyErr_SetString(PyExc_TypeError, "stamps must be a list");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *s = view.buf;
    Py_ssize_t n = view.len, i = start < 0 ? n : start, count = 0, frames = 0;
    int failed = 0;
    while (i < n) {
        Py_ssize_t payload, end;
        if (ws_frame(s, i, n, max_size, &payload, &end) != WS_PLAIN || end > n)
            break;
        Py_ssize_t found = scan_frame(r, s, payload, end, count);
        if (found == FAILED) {
            failed = 1;
            break;
        }
        if (found == DECLINE)
            break;
        double stamp = frame_time(s, payload, end);
        if (stamp != 0.0) {
            PyObject *value = PyFloat_FromDouble(stamp);
            if (value == NULL || PyList_Append(stamps, value) < 0) {
                Py_XDECREF(value);
                failed = 1;
                break;
            }
            Py_DECREF(value);
        }
        count += found;
        frames++;
        i = end;
    }
    if (!failed && count > 0)
        failed = emit(r, s, count, out) < 0;
    PyBuffer_Release(&view);
    if (failed)
        return NULL;
    return Py_BuildValue("(nnn)", i, frames, count);
}

/* Whether s[0:n] holds "status" (with its quotes): what feed.py looks for in a message's first
   STATUS_WINDOW bytes to find status messages, which frames.py leaves to it. */
#define STATUS_WINDOW 64

static int names_status(const unsigned char *s, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i + 8 <= n; i++) {
        if (s[i] == '"' && s[i + 7] == '"' && memcmp(s + i + 1, "status", 6) == 0)
            return 1;
    }
    return 0;
}

/* plain_frames(buffer, start, max_size) -> end: where the run from start of whole plain data
   frames (_wsframe.h) that are not status messages ends. */
static PyObject *fastsplit_plain_frames(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "plain_frames(buffer, start, max_size) takes three "
                                         "arguments");
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[1]), max_size = PyLong_AsSsize_t(args[2]);
    if ((start == -1 || max_size == -1) && PyErr_Occurred())
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *s = view.buf;
    Py_ssize_t n = view.len, i = start < 0 ? n : start;
    while (i < n) {
        Py_ssize_t payload, end;
        if (ws_frame(s, i, n, max_size, &payload, &end) != WS_PLAIN || end > n)
            break;
        Py_ssize_t window = end - payload < STATUS_WINDOW ? end - payload : STATUS_WINDOW;
        if (names_status(s + payload, window))
            break;
        i = end;
    }
    PyBuffer_Release(&view);
    return PyLong_FromSsize_t(i);
}

static int copy_name(PyObject *text, Name *name)
{
    Py_ssize_t size;
    const char *utf8 = PyUnicode_AsUTF8AndSize(text, &size);
    if (utf8 == NULL)
        return -1;
    name->bytes = PyMem_Malloc(size ? (size_t)size : 1);
    if (name->bytes == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memcpy(name->bytes, utf8, (size_t)size);
    name->size = size;
    return 0;
}

/* Return the index of name in r->keys, adding it if new; -1 on error. */
static int key_index(Router *r, PyObject *text)
{
    Name name;
    if (copy_name(text, &name) < 0)
        return -1;
    for (int k = 0; k < r->key_count; k++) {
        if (r->keys[k].size == name.size && memcmp(r->keys[k].bytes, name.bytes, (size_t)name.size) == 0) {
            PyMem_Free(name.bytes);
            return k;
        }
    }
    r->keys[r->key_count] = name;
    return r->key_count++;
}

static int Router_init(Router *r, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"pipes", "route_keys", "default_key", "limit", NULL};
    unsigned int pipes;
    PyObject *route_keys, *default_key;
    Py_ssize_t limit;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "IO!Un", keywords, &pipes, &PyDict_Type,
                                     &route_keys, &default_key, &limit))
        return -1;
    if (r->keys != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Router is initialised once");
        return -1;
    }
    if (pipes < 1) {
        PyErr_Format(PyExc_ValueError, "pipes must be at least 1, got %u", pipes);
        return -1;
    }
    if (limit < 3) {
        PyErr_Format(PyExc_ValueError, "limit must be at least 3, got %zd", limit);
        return -1;
    }
    r->limit = limit;
    Py_ssize_t types = PyDict_Size(route_keys);
    r->pipes = pipes;
    r->keys = PyMem_Calloc((size_t)types + 1, sizeof(Name));
    r->types = PyMem_Calloc((size_t)types + 1, sizeof(TypeKey));
    r->pipe_bytes = PyMem_Calloc(pipes, sizeof(Py_ssize_t));
    r->pipe_events = PyMem_Calloc(pipes, sizeof(long long));
    r->cursor = PyMem_Calloc(pipes, sizeof(char *));
    r->chunks = PyMem_Calloc(pipes, sizeof(PyObject *));
    r->found = PyMem_Calloc((size_t)types + 1, sizeof(Found));
    if (!r->keys || !r->types || !r->pipe_bytes || !r->pipe_events || !r->cursor || !r->chunks ||
        !r->found) {
        PyErr_NoMemory();
        return -1;
    }
    r->default_key = key_index(r, default_key);
    if (r->default_key < 0)
        return -1;
    Py_ssize_t position = 0;
    PyObject *type, *key;
    while (PyDict_Next(route_keys, &position, &type, &key)) {
        if (!PyUnicode_Check(type) || !PyUnicode_Check(key)) {
            PyErr_SetString(PyExc_TypeError, "route_keys must map str to str");
            return -1;
        }
        TypeKey *entry = &r->types[r->type_count];
        if (copy_name(type, &entry->type) < 0)
            return -1;
        r->type_count++;
        entry->key = key_index(r, key);
        if (entry->key < 0)
            return -1;
    }
    return 0;
}

static void Router_dealloc(Router *r)
{
    for (int k = 0; k < r->key_count; k++)
        PyMem_Free(r->keys[k].bytes);
    for (int t = 0; t < r->type_count; t++)
        PyMem_Free(r->types[t].type.bytes);
    PyMem_Free(r->keys);
    PyMem_Free(r->types);
    PyMem_Free(r->events);
    PyMem_Free(r->pipe_bytes);
    PyMem_Free(r->pipe_events);
    PyMem_Free(r->cursor);
    PyMem_Free(r->chunks);
    PyMem_Free(r->found);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

static PyObject *Router_pipe_events(Router *r, PyObject *Py_UNUSED(ignored))
{
    PyObject *counts = PyList_New(r->pipes);
    if (counts == NULL)
        return NULL;
    for (uint32_t p = 0; p < r->pipes; p++) {
        PyObject *count = PyLong_FromLongLong(r->pipe_events[p]);
        if (count == NULL) {
            Py_DECREF(counts);
            return NULL;
        }
        PyList_SET_ITEM(counts, p, count);
    }
    return counts;
}

static PyMethodDef Router_methods[] = {
    {"pipe_events", (PyCFunction)Router_pipe_events, METH_NOARGS,
     "pipe_events() -> list[int]\n\nThe events routed to each pipe so far."},
    {"route", (PyCFunction)(void (*)(void))Router_route, METH_FASTCALL,
     "route(frame, out) -> int\n\nAppend each event of frame, length-prefixed, to out[pipe]; "
     "return the number of events, or -1 (nothing appended) to leave the frame to Python."},
    {"route_frames", (PyCFunction)(void (*)(void))Router_route_frames, METH_FASTCALL,
     "route_frames(buffer, start, max_size, out, stamps) -> (end, frames, events)\n\n"
     "Route the websocket frames in buffer from start, as route does each payload, until one "
     "is not a whole plain data frame or is declined; end is where that frame starts. Appends "
     "one chunk per pipe for all of them, and each frame's time (event_time) to stamps."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Router_members[] = {
    {"layout_events", T_PYSSIZET, offsetof(Router, layout_events), READONLY,
     "events routed by the feed-layout path (the rest by the general scan)"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject RouterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tradebalancer._fastsplit.Router",
    .tp_doc = "Router(pipes, route_keys, default_key, limit): the per-event loop of split.Splitter.",
    .tp_basicsize = sizeof(Router),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Router_init,
    .tp_dealloc = (destructor)Router_dealloc,
    .tp_methods = Router_methods,
    .tp_members = Router_members,
};

static PyObject *check_buffer(PyObject *arg, int (*check)(const unsigned char *, Py_ssize_t))
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    int valid = check(view.buf, view.len);
    PyBuffer_Release(&view);
    return PyBool_FromLong(valid);
}

/* The router's own check on its own: for the tests, and for make bench's cost of it. */
static PyObject *fastsplit_valid_ascii_json(PyObject *module, PyObject *arg)
{
    (void)module;
    return check_buffer(arg, valid_frame);
}

/* Each of its two readers on its own, for the tests: they must agree. */
static PyObject *fastsplit_valid_json_tokens(PyObject *module, PyObject *arg)
{
    (void)module;
    return check_buffer(arg, valid_json);
}

#ifdef __SSE2__
static PyObject *fastsplit_valid_json_blocks(PyObject *module, PyObject *arg)
{
    (void)module;
    return check_buffer(arg, valid_blocks);
}

static PyObject *fastsplit_valid_json_blocks_sse2(PyObject *module, PyObject *arg)
{
    (void)module;
    return check_buffer(arg, valid_blocks_sse2);
}
#endif

static PyMethodDef fastsplit_methods[] = {
    {"plain_frames", (PyCFunction)(void (*)(void))fastsplit_plain_frames, METH_FASTCALL,
     "plain_frames(buffer, start, max_size) -> int\n\nWhere the run of whole plain data "
     "frames that are not status messages (frames.py) that starts at start ends."},
    {"valid_ascii_json", fastsplit_valid_ascii_json, METH_O,
     "valid_ascii_json(buffer) -> bool\n\nWhether buffer is ASCII and valid JSON (RFC 8259), "
     "as the router checks every frame before it routes a byte of it (False: the router "
     "leaves the frame to Python, which rejects it or, for UTF-8 beyond ASCII, parses it)."},
    {"_valid_json_tokens", fastsplit_valid_json_tokens, METH_O,
     "_valid_json_tokens(buffer) -> bool\n\nvalid_ascii_json's token-by-token reader alone "
     "(any frame; the only one without SSE2). For the tests."},
#ifdef __SSE2__
    {"_valid_json_blocks", fastsplit_valid_json_blocks, METH_O,
     "_valid_json_blocks(buffer) -> bool\n\nvalid_ascii_json's SSE2 reader alone: True only "
     "for valid JSON, False for anything it leaves to the other (all but the feed's layout). "
     "For the tests."},
    {"_valid_json_blocks_sse2", fastsplit_valid_json_blocks_sse2, METH_O,
     "_valid_json_blocks_sse2(buffer) -> bool\n\nThe SSE2 build of the block reader, whatever "
     "this CPU has (block_reader says which build the router uses). For the tests."},
#endif
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fastsplit_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "tradebalancer._fastsplit",
    .m_doc = "The balancer's per-event loop in C: see split.py.",
    .m_size = -1,
    .m_methods = fastsplit_methods,
};

PyMODINIT_FUNC PyInit__fastsplit(void)
{
#ifdef __SSE2__
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2"))
        valid_blocks = valid_blocks_avx2;
#endif
    if (PyType_Ready(&RouterType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&fastsplit_module);
    if (module == NULL)
        return NULL;
#ifdef __SSE2__
    const char *reader = valid_blocks == valid_blocks_avx2 ? "avx2" : "sse2";
#else
    const char *reader = "none";
#endif
    if (PyModule_AddStringConstant(module, "block_reader", reader) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    Py_INCREF(&RouterType);
    if (PyModule_AddObject(module, "Router", (PyObject *)&RouterType) < 0) {
        Py_DECREF(&RouterType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
