/* One JSON object per line, written from key/value pairs: the compiled build's access line.

The pure build writes the access line as orjson.dumps of a dict of its fields. Building
that dict (~20 keys) and walking it again in orjson cost ~14,800 instructions a request,
~9% of a short request's CPU in sluice. Here the caller passes the fields as arguments,
each key already encoded, and the line is written in one pass into one buffer.

    line(now, key1, value1, key2, value2, ...) -> bytes

writes {key1 value1,key2 value2,...,"timestamp":"<now, ISO 8601 UTC>"} and a newline:
  - each key is bytes written as given: the JSON string of the name and its colon
    (b'"status":');
  - a value that is Ellipsis is left out with its key (a field that does not apply);
  - None, True, False, int, float and str are written as orjson writes them (the same
    escapes, a float's shortest form, NaN and infinities as null), and any other value
    by orjson itself, so the line is orjson's, byte for byte
    (tests/ops/test_json_line.py holds the two to that);
  - `now` (time.time()) is written as observe.JsonAccessLog writes it: the second by
    strftime("%Y-%m-%dT%H:%M:%S") of its UTC time, then "." and six digits of its
    microseconds, truncated, and "Z".
An error (a str orjson cannot encode either, such as a lone surrogate) is orjson's. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

typedef struct {
    char *data;
    size_t len;
    size_t cap;
    char local[1024];
} Out;

static PyObject *orjson_dumps; /* orjson.dumps, for values this module does not write */

static int out_grow_slow(Out *out, size_t need)
{
    size_t cap = out->cap * 2;
    while (cap < need)
        cap *= 2;
    char *data;
    if (out->data == out->local) {
        data = PyMem_Malloc(cap);
        if (data != NULL)
            memcpy(data, out->local, out->len);
    } else {
        data = PyMem_Realloc(out->data, cap);
    }
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    out->data = data;
    out->cap = cap;
    return 0;
}

static inline int out_grow(Out *out, size_t more)
{
    size_t need = out->len + more;
    return need <= out->cap ? 0 : out_grow_slow(out, need);
}

/* n's decimal digits at w (snprintf costs ~900 instructions a call); returns how many. */
static size_t write_digits(char *w, unsigned long long n)
{
    char reversed[20];
    size_t len = 0;
    do {
        reversed[len++] = (char)('0' + n % 10);
        n /= 10;
    } while (n != 0);
    for (size_t i = 0; i < len; i++)
        w[i] = reversed[len - 1 - i];
    return len;
}

static inline int out_put(Out *out, const char *bytes, size_t len)
{
    if (out_grow(out, len) < 0)
        return -1;
    memcpy(out->data + out->len, bytes, len);
    out->len += len;
    return 0;
}

/* What a byte of a string becomes: 0 itself, 'u' \u00XX, else a backslash and it. */
static char escape_of[256];

static void init_escapes(void)
{
    for (int c = 0; c < 0x20; c++)
        escape_of[c] = 'u';
    escape_of['\b'] = 'b';
    escape_of['\t'] = 't';
    escape_of['\n'] = 'n';
    escape_of['\f'] = 'f';
    escape_of['\r'] = 'r';
    escape_of['"'] = '"';
    escape_of['\\'] = '\\';
}

static int put_str(Out *out, PyObject *value)
{
    Py_ssize_t size;
    const char *utf8 = PyUnicode_AsUTF8AndSize(value, &size);
    if (utf8 == NULL) {
        PyErr_Clear();
        return 1; /* a lone surrogate: orjson's error, from orjson */
    }
    /* At most 6 bytes a byte (\u00XX), the quotes. */
    if (out_grow(out, (size_t)size * 6 + 2) < 0)
        return -1;
    char *w = out->data + out->len;
    *w++ = '"';
    for (Py_ssize_t i = 0; i < size; i++) {
        unsigned char c = (unsigned char)utf8[i];
        char e = escape_of[c];
        if (e == 0) {
            *w++ = (char)c;
        } else if (e == 'u') {
            static const char hex[] = "0123456789abcdef";
            memcpy(w, "\\u00", 4);
            w[4] = hex[c >> 4];
            w[5] = hex[c & 15];
            w += 6;
        } else {
            w[0] = '\\';
            w[1] = e;
            w += 2;
        }
    }
    *w++ = '"';
    out->len = (size_t)(w - out->data);
    return 0;
}

static int put_int(Out *out, PyObject *value)
{
    int overflow;
    long long n = PyLong_AsLongLongAndOverflow(value, &overflow);
    if (overflow)
        return 1; /* past 64 bits: orjson decides (it refuses what it cannot write) */
    if (n == -1 && PyErr_Occurred())
        return -1;
    if (out_grow(out, 21) < 0)
        return -1;
    char *w = out->data + out->len;
    unsigned long long magnitude = (unsigned long long)n;
    if (n < 0) {
        *w++ = '-';
        magnitude = 0ULL - magnitude;
    }
    w += write_digits(w, magnitude);
    out->len = (size_t)(w - out->data);
    return 0;
}

/* units / scale (10 or 100) as the integer part, a dot and the decimals, the last one
   left out when it is 0 (12.30 is 12.3). */
static int put_decimal(Out *out, long long units, int scale)
{
    if (out_grow(out, 24) < 0)
        return -1;
    char *w = out->data + out->len;
    w += write_digits(w, (unsigned long long)(units / scale));
    int part = (int)(units % scale);
    *w++ = '.';
    if (scale == 10) {
        *w++ = (char)('0' + part);
    } else {
        *w++ = (char)('0' + part / 10);
        if (part % 10 != 0)
            *w++ = (char)('0' + part % 10);
    }
    out->len = (size_t)(w - out->data);
    return 0;
}

static int put_float(Out *out, PyObject *value)
{
    double x = PyFloat_AS_DOUBLE(value);
    if (!isfinite(x))
        return out_put(out, "null", 4);
    /* The access line's milliseconds: tenths (and the mean gap's hundredths) of a
       non-negative number below 2**40. Such an x, k / 10.0, prints as k's digits with
       one decimal: the shortest form that reads back as x (no other number of one
       decimal is as near, at this size). Anything else goes to orjson. */
    if (x >= 0.0 && !signbit(x) && x < 1099511627776.0) {
        static const int scales[] = {10, 100};
        for (int i = 0; i < 2; i++) {
            double scaled = x * scales[i];
            long long units = (long long)scaled;
            if ((double)units == scaled && (double)units / scales[i] == x)
                return put_decimal(out, units, scales[i]);
        }
    }
    return 1;
}

static int put_by_orjson(Out *out, PyObject *value)
{
    PyObject *encoded = PyObject_CallOneArg(orjson_dumps, value);
    if (encoded == NULL)
        return -1;
    int result = out_put(out, PyBytes_AS_STRING(encoded), (size_t)PyBytes_GET_SIZE(encoded));
    Py_DECREF(encoded);
    return result;
}

/* Writes one value: 0 done, -1 error set, 1 for orjson to write. */
static int put_value(Out *out, PyObject *value)
{
    if (value == Py_None)
        return out_put(out, "null", 4);
    if (value == Py_True)
        return out_put(out, "true", 4);
    if (value == Py_False)
        return out_put(out, "false", 5);
    if (PyUnicode_CheckExact(value))
        return put_str(out, value);
    if (PyLong_CheckExact(value))
        return put_int(out, value);
    if (PyFloat_CheckExact(value))
        return put_float(out, value);
    return 1;
}

static long long stamp_second = LLONG_MIN; /* no second formatted yet */
static char stamp[32];
static size_t stamp_len;

static int put_timestamp(Out *out, double now)
{
    /* time.time(): a clock of this era, never NaN or past 64 bits (checked: a cast of
       those is undefined). */
    if (!(now >= 0.0 && now < 9.2e18)) {
        PyErr_SetString(PyExc_ValueError, "timestamp out of range");
        return -1;
    }
    long long second = (long long)now;
    if (second != stamp_second) {
        time_t t = (time_t)second;
        struct tm tm;
        if (gmtime_r(&t, &tm) == NULL) {
            PyErr_SetString(PyExc_OverflowError, "timestamp out of range");
            return -1;
        }
        stamp_len = strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%S", &tm);
        stamp_second = second;
    }
    /* As JsonAccessLog: int((now - second) * 1e6), truncated. */
    long micros = (long)((now - (double)second) * 1e6);
    if (micros == 1000000)
        micros = 0; /* a fraction that rounds up: "000000", as str(2_000_000)[1:] */
    if (micros < 0 || micros > 999999) {
        PyErr_SetString(PyExc_ValueError, "timestamp microseconds out of range");
        return -1;
    }
    if (out_grow(out, 13 + stamp_len + 11) < 0)
        return -1;
    char *w = out->data + out->len;
    memcpy(w, "\"timestamp\":\"", 13);
    memcpy(w + 13, stamp, stamp_len);
    w += 13 + stamp_len;
    *w++ = '.';
    for (int i = 5; i >= 0; i--) {
        w[i] = (char)('0' + micros % 10);
        micros /= 10;
    }
    memcpy(w + 6, "Z\"}\n", 4);
    out->len = (size_t)(w + 10 - out->data);
    return 0;
}

static PyObject *line(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs % 2 != 1) {
        PyErr_SetString(PyExc_TypeError, "line(now, key, value, ...) takes pairs after now");
        return NULL;
    }
    double now = PyFloat_AsDouble(args[0]);
    if (now == -1.0 && PyErr_Occurred())
        return NULL;
    Out out = {.len = 0, .cap = sizeof out.local};
    out.data = out.local;
    PyObject *result = NULL;
    if (out_put(&out, "{", 1) < 0)
        goto done;
    for (Py_ssize_t i = 1; i < nargs; i += 2) {
        PyObject *key = args[i];
        PyObject *value = args[i + 1];
        if (value == Py_Ellipsis)
            continue;
        if (!PyBytes_Check(key)) {
            PyErr_SetString(PyExc_TypeError, "a key must be bytes: its JSON string and colon");
            goto done;
        }
        if (out_put(&out, PyBytes_AS_STRING(key), (size_t)PyBytes_GET_SIZE(key)) < 0)
            goto done;
        int written = put_value(&out, value);
        if (written == 1)
            written = put_by_orjson(&out, value);
        if (written < 0)
            goto done;
        if (out_put(&out, ",", 1) < 0)
            goto done;
    }
    if (put_timestamp(&out, now) < 0)
        goto done;
    result = PyBytes_FromStringAndSize(out.data, (Py_ssize_t)out.len);
done:
    if (out.data != out.local)
        PyMem_Free(out.data);
    return result;
}

static PyMethodDef methods[] = {
    {"line", (PyCFunction)(void (*)(void))line, METH_FASTCALL,
     "line(now, key, value, ...): one JSON object and a newline, as orjson writes it."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_jsonline",
    .m_doc = "Access lines written in C.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__jsonline(void)
{
    init_escapes();
    PyObject *orjson = PyImport_ImportModule("orjson");
    if (orjson == NULL)
        return NULL;
    orjson_dumps = PyObject_GetAttrString(orjson, "dumps");
    Py_DECREF(orjson);
    if (orjson_dumps == NULL)
        return NULL;
    return PyModule_Create(&module_def);
}
