/* vLLM's stream chunks read in C: the compiled build's `chunkscan.scan`.

    scan(data: bytes, pos: int, layout: tuple[bytes, ...]) -> tuple[int, int, int, int, int, int]
    scan_tokens(data: bytes, pos: int, layout: tuple[bytes, ...]) -> int
    scan_passed(data: bytes, pos: int, layout: tuple[bytes, ...], table: bytes) -> int

From `pos` (the start of an HTTP chunk's size line in a backend read), the whole chunks
that each hold one SSE event in one of vLLM's commonest forms, spelled for one stream by
`layout` (`chunkscan.layout_of`: the token opening, the token closing, the finish
middle, the finish closing, the usage opening):
- a token chunk: the token opening, a text with no quote in it, the token closing;
- the choice's last chunk: the token opening, a text, the finish middle, a finish reason
  with no quote or backslash, the finish closing, the object's end;
- the usage chunk: the usage opening, its three counts, `}`, the object's end;
where the object's end is `}` and the blank line, with vLLM's system fingerprint before
it or not, and the event's only newline is its blank line's first.

Returns (the position after those chunks, how many carried a text, the finish reason's
start and end in `data` (-1, 0: none), the prompt and completion counts (-1, 0: none)).
A second finish or usage chunk, and anything else (another event, a partial chunk, the
last chunk, a size line it does not read), ends the scan, at the returned position, for
the relay's general path. `scan_tokens` answers the relay's usual read (token chunks
only) in one int, without the tuple: see its comment. `scan_passed` is the guarded
stream's: token chunks whose texts its guard would pass unchanged (chunkscan.scan_passed).

This records what `StreamRelay.feed_chunks` and `ChunkFilter.observe` record of such
events, without each event's copy, its latin-1 decoding and the calls between them;
proxy/chunkscan.py has the same scan in Python, and tests/proxy/test_chunkscan.py
holds the two to each other, to `vllmshape`'s readers, and a relay that scans to one that
reads every event. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

/* The hex digit's value, or -1. */
static int hex_value(unsigned char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

typedef struct {
    const char *data;
    Py_ssize_t size;
} part;

/* The layout's parts, in `chunkscan.layout_of`'s order. */
enum { OPENING, CLOSING, FINISH_MIDDLE, FINISH_CLOSING, USAGE_OPENING, PARTS };

static const char TOTAL[] = ",\"total_tokens\":";
static const char COMPLETION[] = ",\"completion_tokens\":";
static const char FINGERPRINT[] = ",\"system_fingerprint\":\"";
static const char OBJECT_END[] = "}\n\n";

#define LITERAL_SIZE(s) ((Py_ssize_t)(sizeof(s) - 1))

typedef struct {
    Py_ssize_t tokens;
    Py_ssize_t reason_start, reason_end;
    long long prompt, completion;
} records;

static int at(const unsigned char *event, Py_ssize_t size, Py_ssize_t pos, const char *text,
              Py_ssize_t text_size)
{
    return pos <= size - text_size && memcmp(event + pos, text, (size_t)text_size) == 0;
}

/* The count written at `*pos` (1-18 digits, as `vllmshape.digits_at`), `*pos` moved past
   it; -1 when there is none. */
static long long count_at(const unsigned char *event, Py_ssize_t size, Py_ssize_t *pos)
{
    long long value = 0;
    Py_ssize_t i = *pos;
    while (i < size && event[i] >= '0' && event[i] <= '9') {
        if (i - *pos == 18)
            return -1; /* a 19th digit: more than vLLM writes, and past int64 */
        value = value * 10 + (event[i] - '0');
        i++;
    }
    if (i == *pos)
        return -1;
    *pos = i;
    return value;
}

/* Whether `event[from:to]` holds none of the two bytes. */
static int free_of(const unsigned char *event, Py_ssize_t from, Py_ssize_t to, char a, char b)
{
    for (Py_ssize_t i = from; i < to; i++)
        if (event[i] == a || event[i] == b)
            return 0;
    return 1;
}

/* Whether the event's object ends at `p`: `}` and the blank line, or vLLM's system
   fingerprint first (`,"system_fingerprint":"vllm-0.26.0-nohash"`). */
static int object_ends(const unsigned char *event, Py_ssize_t size, Py_ssize_t p)
{
    if (at(event, size, p, FINGERPRINT, LITERAL_SIZE(FINGERPRINT))) {
        Py_ssize_t value = p + LITERAL_SIZE(FINGERPRINT);
        Py_ssize_t value_end = size - 1 - LITERAL_SIZE(OBJECT_END);
        if (value_end < value || event[value_end] != '"' ||
            !free_of(event, value, value_end, '"', '\\'))
            return 0;
        p = value_end + 1;
    }
    return p == size - LITERAL_SIZE(OBJECT_END) &&
           memcmp(event + p, OBJECT_END, (size_t)LITERAL_SIZE(OBJECT_END)) == 0;
}

/* Where the text after the token opening ends (at the next quote): -1 when the event does
   not begin with `opening` or has no quote after it. */
static Py_ssize_t text_end_after(const unsigned char *event, Py_ssize_t size, const part *opening)
{
    if (!at(event, size, 0, opening->data, opening->size))
        return -1;
    const unsigned char *quote =
        memchr(event + opening->size, '"', (size_t)(size - opening->size));
    return quote == NULL ? -1 : quote - event;
}

/* Whether the rest of the event, from the text's end, is the token closing: a token chunk. */
static int token_closes(const unsigned char *event, Py_ssize_t size, Py_ssize_t text_end,
                        const part *closing)
{
    return text_end == size - closing->size && at(event, size, text_end, closing->data, closing->size);
}

/* A token chunk or the choice's last chunk; its records added. 0: neither. `base`: the
   event's position in the read, for the reason's span. */
static int read_choice(const unsigned char *event, Py_ssize_t size, const part *layout,
                       Py_ssize_t base, records *found)
{
    Py_ssize_t text_start = layout[OPENING].size;
    Py_ssize_t text_end = text_end_after(event, size, &layout[OPENING]);
    if (text_end < 0)
        return 0;
    if (token_closes(event, size, text_end, &layout[CLOSING])) {
        found->tokens += text_end > text_start;
        return 1;
    }
    /* The last chunk: its finish reason after the middle, up to the next quote. */
    const part *middle = &layout[FINISH_MIDDLE];
    const part *finish_closing = &layout[FINISH_CLOSING];
    if (found->reason_start >= 0 || !at(event, size, text_end, middle->data, middle->size))
        return 0;
    Py_ssize_t reason_start = text_end + middle->size;
    const unsigned char *reason_quote =
        memchr(event + reason_start, '"', (size_t)(size - reason_start));
    if (reason_quote == NULL)
        return 0;
    Py_ssize_t reason_end = reason_quote - event;
    if (!free_of(event, reason_start, reason_end, '\\', '\\') ||
        !at(event, size, reason_end, finish_closing->data, finish_closing->size) ||
        !object_ends(event, size, reason_end + finish_closing->size))
        return 0;
    found->tokens += text_end > text_start;
    found->reason_start = base + reason_start;
    found->reason_end = base + reason_end;
    return 1;
}

/* vLLM's usage chunk; its counts recorded. 0: not one. */
static int read_usage(const unsigned char *event, Py_ssize_t size, const part *layout,
                      records *found)
{
    const part *opening = &layout[USAGE_OPENING];
    if (found->prompt >= 0 || !at(event, size, 0, opening->data, opening->size))
        return 0;
    Py_ssize_t p = opening->size;
    long long prompt = count_at(event, size, &p);
    if (prompt < 0 || !at(event, size, p, TOTAL, LITERAL_SIZE(TOTAL)))
        return 0;
    p += LITERAL_SIZE(TOTAL);
    if (count_at(event, size, &p) < 0 || !at(event, size, p, COMPLETION, LITERAL_SIZE(COMPLETION)))
        return 0;
    p += LITERAL_SIZE(COMPLETION);
    long long completion = count_at(event, size, &p);
    if (completion < 0 || p >= size || event[p] != '}')
        return 0;
    if (!object_ends(event, size, p + 1))
        return 0;
    found->prompt = prompt;
    found->completion = completion;
    return 1;
}

/* The chunk at `pos`, when it is whole in `data` and holds one event as vLLM sends it
   (its only newline the first of its blank line): the event's start in `*start`, its size
   in `*size`, and the chunk's end returned; -1 otherwise. */
static Py_ssize_t event_chunk(const unsigned char *data, Py_ssize_t n, Py_ssize_t pos,
                              Py_ssize_t *start_out, Py_ssize_t *size_out)
{
    /* The size line: 1-8 hex digits and CRLF (chunk extensions are the parser's). */
    Py_ssize_t size = 0;
    Py_ssize_t i = pos;
    while (i < n && i - pos < 9) {
        int digit = hex_value(data[i]);
        if (digit < 0)
            break;
        size = size * 16 + digit;
        i++;
    }
    if (i == pos || i - pos > 8 || size < 2 || i + 1 >= n)
        return -1;
    if (data[i] != '\r' || data[i + 1] != '\n')
        return -1;
    Py_ssize_t start = i + 2;
    Py_ssize_t end = start + size;
    if (end + 2 > n || data[end] != '\r' || data[end + 1] != '\n' || data[end - 1] != '\n')
        return -1;
    const unsigned char *event = data + start;
    if (memchr(event, '\n', (size_t)size) != event + size - 2)
        return -1; /* another line before the blank line */
    *start_out = start;
    *size_out = size;
    return end + 2;
}

/* The end of the chunk at `pos` when its event is one of the forms above (its records
   added to `found`); -1 otherwise. */
static Py_ssize_t chunk_end(const unsigned char *data, Py_ssize_t n, Py_ssize_t pos,
                            const part *layout, records *found)
{
    Py_ssize_t start, size;
    Py_ssize_t end = event_chunk(data, n, pos, &start, &size);
    if (end < 0)
        return -1;
    const unsigned char *event = data + start;
    if (!read_choice(event, size, layout, start, found) && !read_usage(event, size, layout, found))
        return -1;
    return end;
}

/* The scan itself, for both entry points: `*pos` moved past the chunks it takes, what
   they record in `*found`. 0 with an exception set for arguments of the wrong type. */
static int scan_records(PyObject *const *args, Py_ssize_t nargs, const char *name,
                        Py_ssize_t *pos_out, records *found)
{
    if (nargs != 3 || !PyBytes_Check(args[0]) || !PyTuple_Check(args[2]) ||
        PyTuple_GET_SIZE(args[2]) != PARTS) {
        PyErr_Format(PyExc_TypeError, "%s(data: bytes, pos: int, layout: 5 bytes in a tuple)",
                     name);
        return 0;
    }
    part layout[PARTS];
    for (int i = 0; i < PARTS; i++) {
        PyObject *item = PyTuple_GET_ITEM(args[2], i);
        if (!PyBytes_Check(item)) {
            PyErr_Format(PyExc_TypeError, "%s: the layout's parts are bytes", name);
            return 0;
        }
        layout[i].data = PyBytes_AS_STRING(item);
        layout[i].size = PyBytes_GET_SIZE(item);
    }
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    if (pos == -1 && PyErr_Occurred())
        return 0;
    if (pos < 0) {
        PyErr_Format(PyExc_ValueError, "%s: pos must not be negative", name);
        return 0;
    }
    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t n = PyBytes_GET_SIZE(args[0]);
    while (pos < n) {
        Py_ssize_t next = chunk_end(data, n, pos, layout, found);
        if (next < 0)
            break;
        pos = next;
    }
    *pos_out = pos;
    return 1;
}

static PyObject *scan(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t pos;
    records found = {0, -1, 0, -1, 0};
    if (!scan_records(args, nargs, "scan", &pos, &found))
        return NULL;
    /* Built by hand: Py_BuildValue parses its format on every call. */
    PyObject *result = PyTuple_New(6);
    if (result == NULL)
        return NULL;
    PyObject *items[6] = {
        PyLong_FromSsize_t(pos),           PyLong_FromSsize_t(found.tokens),
        PyLong_FromSsize_t(found.reason_start), PyLong_FromSsize_t(found.reason_end),
        PyLong_FromLongLong(found.prompt), PyLong_FromLongLong(found.completion),
    };
    for (int i = 0; i < 6; i++) {
        if (items[i] == NULL) {
            for (int j = 0; j < 6; j++)
                Py_XDECREF(items[j]);
            Py_DECREF(result);
            return NULL;
        }
    }
    for (int i = 0; i < 6; i++)
        PyTuple_SET_ITEM(result, i, items[i]);
    return result;
}

/* chunkscan.PACK_SHIFT: the tokens' place in scan_tokens' answer. */
#define PACK_SHIFT 24
#define PACK_LIMIT ((Py_ssize_t)1 << PACK_SHIFT)

/* The relay's usual read, whose chunks hold tokens only, answered in one int: the position
   after them, and how many carried a text shifted by PACK_SHIFT. -1 where they held a
   finish reason or usage counts, or a figure does not fit: `scan` reads those. */
static PyObject *scan_tokens(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t pos;
    records found = {0, -1, 0, -1, 0};
    if (!scan_records(args, nargs, "scan_tokens", &pos, &found))
        return NULL;
    if (found.reason_start >= 0 || found.prompt >= 0 || pos >= PACK_LIMIT ||
        found.tokens >= PACK_LIMIT)
        return PyLong_FromLong(-1);
    return PyLong_FromSsize_t(pos | (found.tokens << PACK_SHIFT));
}

/* GuardSpec.pass_table's values (stopwords.PASS_NEVER, PASS_CHECK) and its ASCII part. */
#define PASS_NEVER 1
#define PASS_CHECK 2
#define PASS_ASCII 128
/* chunkscan.LAST_SHIFT: the last text's last character's place in scan_passed's answer. */
#define LAST_SHIFT (2 * PACK_SHIFT)

static unsigned char folded(unsigned char c, int icase)
{
    return icase && c >= 'A' && c <= 'Z' ? (unsigned char)(c + ('a' - 'A')) : c;
}

/* Whether the guard's pass table passes `text` (a token's raw JSON string content), as
   chunkscan.text_passes: ASCII with no escape, no PASS_NEVER character, and either no
   PASS_CHECK one or no literal prefix beginning anywhere in it. */
static int text_passes(const unsigned char *text, Py_ssize_t size, const unsigned char *table,
                       Py_ssize_t table_size)
{
    int check = 0;
    for (Py_ssize_t i = 0; i < size; i++) {
        unsigned char c = text[i];
        if (c >= PASS_ASCII || c == '\\')
            return 0;
        unsigned char kind = table[c];
        if (kind == PASS_NEVER)
            return 0;
        check |= kind == PASS_CHECK;
    }
    if (!check)
        return 1;
    for (Py_ssize_t p = PASS_ASCII; p + 2 <= table_size;) {
        int icase = table[p];
        Py_ssize_t length = table[p + 1];
        const unsigned char *literal = table + p + 2;
        p += 2 + length;
        if (length == 0 || p > table_size)
            return 0; /* not a table GuardSpec writes: pass nothing */
        for (Py_ssize_t at = 0; at < size; at++) {
            if (folded(text[at], icase) != literal[0])
                continue;
            Py_ssize_t common = size - at < length ? size - at : length;
            Py_ssize_t k = 1;
            while (k < common && folded(text[at + k], icase) == literal[k])
                k++;
            if (k == common)
                return 0; /* a match (or the start of one) may begin here */
        }
    }
    return 1;
}

/* A guarded stream's token chunks that its idle guard passes unchanged, in one int (-1
   from a position the answer cannot hold): see chunkscan.scan_passed. */
static PyObject *scan_passed(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyBytes_Check(args[0]) || !PyTuple_Check(args[2]) ||
        PyTuple_GET_SIZE(args[2]) != PARTS || !PyBytes_Check(args[3]) ||
        PyBytes_GET_SIZE(args[3]) < PASS_ASCII) {
        PyErr_SetString(PyExc_TypeError, "scan_passed(data: bytes, pos: int, layout: 5 bytes in "
                                         "a tuple, table: bytes of at least 128)");
        return NULL;
    }
    PyObject *opening_item = PyTuple_GET_ITEM(args[2], OPENING);
    PyObject *closing_item = PyTuple_GET_ITEM(args[2], CLOSING);
    if (!PyBytes_Check(opening_item) || !PyBytes_Check(closing_item)) {
        PyErr_SetString(PyExc_TypeError, "scan_passed: the layout's parts are bytes");
        return NULL;
    }
    const part opening = {PyBytes_AS_STRING(opening_item), PyBytes_GET_SIZE(opening_item)};
    const part closing = {PyBytes_AS_STRING(closing_item), PyBytes_GET_SIZE(closing_item)};
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    if (pos == -1 && PyErr_Occurred())
        return NULL;
    if (pos < 0) {
        PyErr_SetString(PyExc_ValueError, "scan_passed: pos must not be negative");
        return NULL;
    }
    if (pos >= PACK_LIMIT)
        return PyLong_FromLong(-1); /* past what the answer holds: the relay reads on */
    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t n = PyBytes_GET_SIZE(args[0]);
    const unsigned char *table = (const unsigned char *)PyBytes_AS_STRING(args[3]);
    Py_ssize_t table_size = PyBytes_GET_SIZE(args[3]);
    Py_ssize_t tokens = 0;
    long long last = 0;
    while (pos < n && tokens < PACK_LIMIT - 1) {
        Py_ssize_t start, size;
        Py_ssize_t end = event_chunk(data, n, pos, &start, &size);
        if (end < 0 || end > PACK_LIMIT - 1)
            break;
        const unsigned char *event = data + start;
        Py_ssize_t text_end = text_end_after(event, size, &opening);
        if (text_end <= opening.size || !token_closes(event, size, text_end, &closing) ||
            !text_passes(event + opening.size, text_end - opening.size, table, table_size))
            break;
        tokens++;
        last = event[text_end - 1];
        pos = end;
    }
    return PyLong_FromLongLong((long long)pos | ((long long)tokens << PACK_SHIFT) |
                               (last << LAST_SHIFT));
}

static PyMethodDef methods[] = {
    {"scan", (PyCFunction)(void (*)(void))scan, METH_FASTCALL,
     "scan(data, pos, layout): the position after vLLM's common chunks from pos, and "
     "what they record (tokens, the finish reason's span, the usage counts)."},
    {"scan_tokens", (PyCFunction)(void (*)(void))scan_tokens, METH_FASTCALL,
     "scan_tokens(data, pos, layout): scan's position | its tokens << 24, or -1 where the "
     "chunks held a finish reason or usage counts."},
    {"scan_passed", (PyCFunction)(void (*)(void))scan_passed, METH_FASTCALL,
     "scan_passed(data, pos, layout, table): the position after the token chunks an idle "
     "guard passes | their count << 24 | the last text's last character << 48."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_chunkscan",
    .m_doc = "vLLM's stream chunks read in C.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__chunkscan(void)
{
    return PyModule_Create(&module_def);
}
