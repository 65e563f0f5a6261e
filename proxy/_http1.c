/* HTTP/1.1 message heads read by llhttp with C callbacks: the compiled build's parser.

httptools (the pure build's parser) calls a Python method per header: on the request
path that call, its two bytes objects and the name's lowering cost ~1,900 instructions a
header, about 9% of a short request's CPU in sluice. This parser runs the same llhttp
(vendor/llhttp, the version httptools 0.9.0 bundles) and collects a head's headers in
C: each name lower-cased as it is copied, into one dict handed over with the head.

It keeps httptools' interface and behaviour wherever sluice relies on them
(tests/proxy/test_http1_parser.py runs both on the same bytes):
  - feed_data raises httptools' own exception classes, mapped from llhttp's error the way
    httptools maps them, and HttpParserUpgrade(offset) at an upgrade;
  - on_headers_complete returning makes llhttp skip the body of an upgrade request;
  - get_method, get_http_version, should_keep_alive, get_status_code.
What differs is the protocol's callbacks:
  - on_url(url) is called once, with the whole target, when it ends (or as soon as it
    grows past max_url, so the protocol can refuse it);
  - on_header is never called: on_headers_complete(headers) gets a dict of lower-cased
    names; a request's repeated header is joined with ", ", a response's last one wins
    (what proxy/reader.py and proxy/upstream.py do with httptools' calls); a chunked
    body's trailers count against the limits but are not added (nor do those two keep
    them from httptools);
  - on_headers_too_large() is called, and must raise, when a header would bring the
    head's header bytes (name + value + 4 each) past max_header_bytes or the number of
    distinct names past max_header_count.
  - feed_data (or __init__) called from one of the parser's own callbacks raises
    RuntimeError: llhttp cannot be entered again while it runs.
Nothing here decides what is valid HTTP: llhttp does, with the settings httptools uses. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#include "llhttp.h"

typedef struct {
    char *data;
    size_t len;
    size_t cap;
} Buffer;

typedef struct {
    PyObject_HEAD
    llhttp_t parser;
    int join_repeated; /* a request's repeated header joined; else the last one kept */
    size_t max_url;
    size_t max_header_bytes;
    Py_ssize_t max_header_count;
    size_t header_bytes;
    int pending; /* a header read whole, not yet added (see add_header) */
    int in_trailers; /* the head was handed over: headers now are a chunked body's trailers */
    int executing; /* inside llhttp_execute, which must not be entered again */
    int url_given; /* on_url was called for this message's target */
    Buffer url;
    Buffer name;
    Buffer value;
    PyObject *headers; /* the head being read */
    PyObject *last_error;
    /* The protocol's bound methods (None-free: NULL when the protocol has none). */
    PyObject *on_message_begin;
    PyObject *on_url;
    PyObject *on_headers_complete;
    PyObject *on_headers_too_large;
    PyObject *on_body;
    PyObject *on_message_complete;
    PyObject *on_chunk_header;
    PyObject *on_chunk_complete;
} Parser;

static PyObject *HttpParserError;
static PyObject *HttpParserCallbackError;
static PyObject *HttpParserInvalidStatusError;
static PyObject *HttpParserInvalidMethodError;
static PyObject *HttpParserInvalidURLError;
static PyObject *HttpParserUpgrade;
static PyObject *version_1_1;
static PyObject *version_1_0;
static PyObject *method_names[64]; /* bytes per llhttp method, made on first use */
static llhttp_settings_t request_settings;
static llhttp_settings_t response_settings;

#define PARSER(p) ((Parser *)(p)->data)

static int buffer_add(Buffer *buffer, const char *at, size_t length) {
    if (length > (size_t)PY_SSIZE_T_MAX - buffer->len) {
        return -1;
    }
    size_t need = buffer->len + length;
    if (need > buffer->cap) {
        size_t cap = buffer->cap ? buffer->cap : 64;
        while (cap < need) {
            cap = cap > (size_t)PY_SSIZE_T_MAX / 2 ? need : cap * 2;
        }
        char *data = PyMem_Realloc(buffer->data, cap);
        if (data == NULL) {
            return -1;
        }
        buffer->data = data;
        buffer->cap = cap;
    }
    memcpy(buffer->data + buffer->len, at, length);
    buffer->len += length;
    return 0;
}

/* A Python callback's exception, kept to become the __context__ of the error feed_data
   raises, as httptools does. */
static int callback_failed(llhttp_t *p, const char *reason) {
    Parser *self = PARSER(p);
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    if (value != NULL && traceback != NULL) {
        PyException_SetTraceback(value, traceback);
    }
    Py_XDECREF(type);
    Py_XDECREF(traceback);
    Py_XSETREF(self->last_error, value);
    if (reason != NULL) {
        llhttp_set_error_reason(p, reason);
        return HPE_USER;
    }
    return -1;
}

static int call0(llhttp_t *p, PyObject *callback) {
    if (callback == NULL) {
        return 0;
    }
    PyObject *result = PyObject_CallNoArgs(callback);
    if (result == NULL) {
        return callback_failed(p, NULL);
    }
    Py_DECREF(result);
    return 0;
}

static int call1(llhttp_t *p, PyObject *callback, PyObject *arg, const char *reason) {
    if (arg == NULL) {
        return callback_failed(p, reason);
    }
    PyObject *result = PyObject_CallOneArg(callback, arg);
    Py_DECREF(arg);
    if (result == NULL) {
        return callback_failed(p, reason);
    }
    Py_DECREF(result);
    return 0;
}

static int cb_message_begin(llhttp_t *p) {
    Parser *self = PARSER(p);
    self->url.len = 0;
    self->name.len = 0;
    self->value.len = 0;
    self->header_bytes = 0;
    self->pending = 0;
    self->in_trailers = 0;
    self->url_given = 0;
    Py_XSETREF(self->headers, PyDict_New());
    if (self->headers == NULL) {
        return callback_failed(p, NULL);
    }
    return call0(p, self->on_message_begin);
}

static int give_url(llhttp_t *p) {
    Parser *self = PARSER(p);
    self->url_given = 1;
    PyObject *url = PyBytes_FromStringAndSize(self->url.data, (Py_ssize_t)self->url.len);
    return call1(p, self->on_url, url, "`on_url` callback error");
}

static int cb_url(llhttp_t *p, const char *at, size_t length) {
    Parser *self = PARSER(p);
    if (self->on_url == NULL || self->url_given) {
        return 0;
    }
    if (buffer_add(&self->url, at, length) < 0) {
        PyErr_NoMemory();
        return callback_failed(p, "`on_url` callback error");
    }
    if (self->url.len > self->max_url) {
        int error = give_url(p); /* the protocol refuses it */
        if (error == 0) {
            PyErr_SetString(HttpParserError, "url too long");
            error = callback_failed(p, "`on_url` callback error");
        }
        return error;
    }
    return 0;
}

static int cb_url_complete(llhttp_t *p) {
    Parser *self = PARSER(p);
    if (self->on_url == NULL || self->url_given) {
        return 0;
    }
    int error = give_url(p);
    return error == HPE_USER ? -1 : error;
}

static int too_large(llhttp_t *p) {
    Parser *self = PARSER(p);
    if (self->on_headers_too_large != NULL) {
        PyObject *result = PyObject_CallNoArgs(self->on_headers_too_large);
        if (result == NULL) {
            return callback_failed(p, "`on_header_value` callback error");
        }
        Py_DECREF(result);
    }
    PyErr_SetString(HttpParserError, "headers too large");
    return callback_failed(p, "`on_header_value` callback error");
}

static int add_header(llhttp_t *p);

/* Names as sent, each with its lower-cased bytes: a proxy's clients send the same few
   names on every request, so a name seen before costs a compare, and its key comes with
   its hash (a dict's lookup and insertion then hash nothing). Bounded: the first
   KNOWN_NAMES distinct names up to KNOWN_NAME_BYTES long; any other is lowered anew. */
#define KNOWN_NAMES 64
#define KNOWN_NAME_BYTES 40
static struct {
    size_t len;
    char given[KNOWN_NAME_BYTES];
    PyObject *lowered;
} known_names[KNOWN_NAMES];
static int known_count;

static PyObject *lowered_name(const char *given, size_t len) {
    for (int i = 0; i < known_count; i++) {
        if (known_names[i].len == len && memcmp(known_names[i].given, given, len) == 0) {
            return Py_NewRef(known_names[i].lowered);
        }
    }
    PyObject *name = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)len);
    if (name == NULL) {
        return NULL;
    }
    char *lowered = PyBytes_AS_STRING(name);
    for (size_t i = 0; i < len; i++) {
        char c = given[i];
        lowered[i] = (c >= 'A' && c <= 'Z') ? (char)(c + 32) : c;
    }
    if (known_count < KNOWN_NAMES && len <= KNOWN_NAME_BYTES) {
        if (PyObject_Hash(name) == -1) { /* computed once, kept by the bytes object */
            Py_DECREF(name);
            return NULL;
        }
        known_names[known_count].len = len;
        memcpy(known_names[known_count].given, given, len);
        known_names[known_count].lowered = Py_NewRef(name);
        known_count++;
    }
    return name;
}

static int cb_header_field(llhttp_t *p, const char *at, size_t length) {
    Parser *self = PARSER(p);
    if (self->pending && add_header(p) < 0) {
        llhttp_set_error_reason(p, "`on_header_field` callback error");
        return HPE_USER;
    }
    if (buffer_add(&self->name, at, length) < 0) {
        PyErr_NoMemory();
        return callback_failed(p, "`on_header_field` callback error");
    }
    return 0;
}

static int cb_header_value(llhttp_t *p, const char *at, size_t length) {
    Parser *self = PARSER(p);
    if (buffer_add(&self->value, at, length) < 0) {
        PyErr_NoMemory();
        return callback_failed(p, "`on_header_value` callback error");
    }
    return 0;
}

/* A header read whole is added (and the limits checked) where httptools calls on_header:
   when the next header's name begins, or the head (or a chunk, for trailers) ends; so a
   head cut short or malformed right after a header over the limits is refused as it is
   with httptools. What a header's spans hold meanwhile is bounded by what the protocol
   feeds: proxy/reader.py feeds a head at most MAX_HEAD_BYTES.

   Its name is lower-cased into the head's dict. Returns 0, or -1 with the error kept. */
static int add_header(llhttp_t *p) {
    Parser *self = PARSER(p);
    self->pending = 0;
    size_t name_len = self->name.len, value_len = self->value.len;
    self->name.len = 0;
    self->value.len = 0;
    self->header_bytes += name_len + value_len + 4;
    if (self->headers == NULL) {
        self->headers = PyDict_New();
        if (self->headers == NULL) {
            return callback_failed(p, NULL);
        }
    }
    if (self->header_bytes > self->max_header_bytes ||
        PyDict_GET_SIZE(self->headers) >= self->max_header_count) {
        too_large(p);
        return -1;
    }
    if (self->in_trailers) {
        return 0; /* counted against the limits, not kept (see cb_headers_complete) */
    }
    PyObject *name = lowered_name(self->name.data, name_len);
    if (name == NULL) {
        return callback_failed(p, NULL);
    }
    PyObject *value = PyBytes_FromStringAndSize(self->value.data, (Py_ssize_t)value_len);
    if (value == NULL) {
        Py_DECREF(name);
        return callback_failed(p, NULL);
    }
    if (self->join_repeated) {
        /* Inserts the value unless the name is there: one lookup for the usual case. */
        Py_ssize_t size = PyDict_GET_SIZE(self->headers);
        PyObject *previous = PyDict_SetDefault(self->headers, name, value);
        /* Added, not found (comparing the objects would not do: b"" and one-byte values
           are shared objects). */
        if (previous != NULL && PyDict_GET_SIZE(self->headers) > size) {
            Py_DECREF(name);
            Py_DECREF(value);
            return 0;
        }
        if (previous != NULL && !PyBytes_Check(previous)) {
            PyErr_SetString(PyExc_TypeError, "a header's value is not bytes");
            previous = NULL;
        }
        if (previous != NULL) {
            Py_INCREF(previous);
            Py_ssize_t before = PyBytes_GET_SIZE(previous);
            PyObject *joined = PyBytes_FromStringAndSize(NULL, before + 2 + (Py_ssize_t)value_len);
            if (joined != NULL) {
                char *out = PyBytes_AS_STRING(joined);
                memcpy(out, PyBytes_AS_STRING(previous), (size_t)before);
                memcpy(out + before, ", ", 2);
                memcpy(out + before + 2, self->value.data, value_len);
            }
            Py_DECREF(previous);
            Py_SETREF(value, joined);
        }
        if (value == NULL || PyErr_Occurred()) {
            Py_DECREF(name);
            Py_XDECREF(value);
            return callback_failed(p, NULL);
        }
    }
    int failed = PyDict_SetItem(self->headers, name, value);
    Py_DECREF(name);
    Py_DECREF(value);
    return failed ? callback_failed(p, NULL) : 0;
}

static int cb_header_value_complete(llhttp_t *p) {
    PARSER(p)->pending = 1;
    return 0;
}

/* The head's dict is handed over. A chunked body's trailers after it count against the
   header limits but are not added: they arrive after the head was checked and acted on
   (proxy/reader.py and proxy/upstream.py ignore httptools' calls for them too). */
static int cb_headers_complete(llhttp_t *p) {
    Parser *self = PARSER(p);
    if (self->pending && add_header(p) < 0) {
        return -1;
    }
    self->in_trailers = 1;
    if (self->headers == NULL) {
        self->headers = PyDict_New();
        if (self->headers == NULL) {
            return callback_failed(p, NULL);
        }
    }
    if (self->on_headers_complete != NULL) {
        PyObject *result = PyObject_CallOneArg(self->on_headers_complete, self->headers);
        if (result == NULL) {
            return callback_failed(p, NULL);
        }
        Py_DECREF(result);
    }
    return p->upgrade ? 1 : 0; /* as httptools: an upgrade's body is not read as HTTP */
}

static int cb_body(llhttp_t *p, const char *at, size_t length) {
    Parser *self = PARSER(p);
    if (self->on_body == NULL) {
        return 0;
    }
    PyObject *body = PyBytes_FromStringAndSize(at, (Py_ssize_t)length);
    return call1(p, self->on_body, body, "`on_body` callback error");
}

static int cb_message_complete(llhttp_t *p) {
    return call0(p, PARSER(p)->on_message_complete);
}

static int cb_chunk_header(llhttp_t *p) {
    return call0(p, PARSER(p)->on_chunk_header);
}

static int cb_chunk_complete(llhttp_t *p) {
    Parser *self = PARSER(p);
    if (self->pending && add_header(p) < 0) { /* a trailer */
        return -1;
    }
    return call0(p, self->on_chunk_complete);
}

static PyObject *bound(PyObject *protocol, const char *name) {
    PyObject *method = PyObject_GetAttrString(protocol, name);
    if (method == NULL) {
        PyErr_Clear(); /* the protocol has no such callback */
    }
    return method;
}

static int parser_init(Parser *self, PyObject *args, PyObject *kwargs, int is_request) {
    static char *keywords[] = {"protocol", "max_url", "max_header_bytes", "max_header_count",
                               NULL};
    PyObject *protocol;
    Py_ssize_t max_url = PY_SSIZE_T_MAX, max_header_bytes = PY_SSIZE_T_MAX;
    Py_ssize_t max_header_count = PY_SSIZE_T_MAX;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|nnn", keywords, &protocol, &max_url,
                                     &max_header_bytes, &max_header_count)) {
        return -1;
    }
    if (self->executing) {
        PyErr_SetString(PyExc_RuntimeError, "a parser cannot be initialised from its callbacks");
        return -1;
    }
    if (max_url < 0 || max_header_bytes < 0 || max_header_count < 0) {
        PyErr_SetString(PyExc_ValueError, "limits must not be negative");
        return -1;
    }
    self->join_repeated = is_request;
    self->max_url = (size_t)max_url;
    self->max_header_bytes = (size_t)max_header_bytes;
    self->max_header_count = max_header_count;
    llhttp_init(&self->parser, is_request ? HTTP_REQUEST : HTTP_RESPONSE,
                is_request ? &request_settings : &response_settings);
    self->parser.data = self;
    Py_CLEAR(self->headers);
    Py_CLEAR(self->last_error);
    Py_XSETREF(self->on_message_begin, bound(protocol, "on_message_begin"));
    Py_XSETREF(self->on_url, is_request ? bound(protocol, "on_url") : NULL);
    Py_XSETREF(self->on_headers_complete, bound(protocol, "on_headers_complete"));
    Py_XSETREF(self->on_headers_too_large, bound(protocol, "on_headers_too_large"));
    Py_XSETREF(self->on_body, bound(protocol, "on_body"));
    Py_XSETREF(self->on_message_complete, bound(protocol, "on_message_complete"));
    Py_XSETREF(self->on_chunk_header, bound(protocol, "on_chunk_header"));
    Py_XSETREF(self->on_chunk_complete, bound(protocol, "on_chunk_complete"));
    return 0;
}

static int request_init(Parser *self, PyObject *args, PyObject *kwargs) {
    return parser_init(self, args, kwargs, 1);
}

static int response_init(Parser *self, PyObject *args, PyObject *kwargs) {
    return parser_init(self, args, kwargs, 0);
}

static int parser_traverse(Parser *self, visitproc visit, void *arg) {
    Py_VISIT(self->headers);
    Py_VISIT(self->last_error);
    Py_VISIT(self->on_message_begin);
    Py_VISIT(self->on_url);
    Py_VISIT(self->on_headers_complete);
    Py_VISIT(self->on_headers_too_large);
    Py_VISIT(self->on_body);
    Py_VISIT(self->on_message_complete);
    Py_VISIT(self->on_chunk_header);
    Py_VISIT(self->on_chunk_complete);
    return 0;
}

static int parser_clear(Parser *self) {
    Py_CLEAR(self->headers);
    Py_CLEAR(self->last_error);
    Py_CLEAR(self->on_message_begin);
    Py_CLEAR(self->on_url);
    Py_CLEAR(self->on_headers_complete);
    Py_CLEAR(self->on_headers_too_large);
    Py_CLEAR(self->on_body);
    Py_CLEAR(self->on_message_complete);
    Py_CLEAR(self->on_chunk_header);
    Py_CLEAR(self->on_chunk_complete);
    return 0;
}

static void parser_dealloc(Parser *self) {
    PyObject_GC_UnTrack(self);
    parser_clear(self);
    PyMem_Free(self->url.data);
    PyMem_Free(self->name.data);
    PyMem_Free(self->value.data);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* llhttp's error as httptools raises it. */
static void raise_error(Parser *self) {
    llhttp_errno_t error = llhttp_get_errno(&self->parser);
    PyObject *cls;
    switch (error) {
    case HPE_CB_MESSAGE_BEGIN:
    case HPE_CB_HEADERS_COMPLETE:
    case HPE_CB_MESSAGE_COMPLETE:
    case HPE_CB_CHUNK_HEADER:
    case HPE_CB_CHUNK_COMPLETE:
    case HPE_CB_URL_COMPLETE:
    case HPE_CB_HEADER_VALUE_COMPLETE:
    case HPE_USER:
        cls = HttpParserCallbackError;
        break;
    case HPE_INVALID_STATUS:
        cls = HttpParserInvalidStatusError;
        break;
    case HPE_INVALID_METHOD:
        cls = HttpParserInvalidMethodError;
        break;
    case HPE_INVALID_URL:
        cls = HttpParserInvalidURLError;
        break;
    default:
        cls = HttpParserError;
    }
    const char *reason = llhttp_get_error_reason(&self->parser);
    PyObject *text = PyUnicode_DecodeLatin1(reason ? reason : "", reason ? (Py_ssize_t)strlen(reason) : 0, NULL);
    if (text == NULL) {
        return;
    }
    PyObject *exc = PyObject_CallOneArg(cls, text);
    Py_DECREF(text);
    if (exc == NULL) {
        return;
    }
    if (cls == HttpParserCallbackError && self->last_error != NULL) {
        PyException_SetContext(exc, self->last_error); /* steals the reference */
        self->last_error = NULL;
    }
    PyErr_SetObject(cls, exc);
    Py_DECREF(exc);
}

static PyObject *feed_data(Parser *self, PyObject *data) {
    if (self->parser.settings == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the parser was not initialised");
        return NULL;
    }
    Py_buffer view;
    const char *at;
    Py_ssize_t length;
    int owned = 0;
    if (PyBytes_CheckExact(data)) {
        at = PyBytes_AS_STRING(data);
        length = PyBytes_GET_SIZE(data);
    } else {
        if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) {
            return NULL;
        }
        owned = 1;
        at = view.buf;
        length = view.len;
    }
    if (self->executing) {
        if (owned) {
            PyBuffer_Release(&view);
        }
        PyErr_SetString(PyExc_RuntimeError, "feed_data called from the parser's own callback");
        return NULL;
    }
    Py_INCREF(self); /* a callback may drop the protocol's reference to its parser */
    self->executing = 1;
    llhttp_errno_t error = llhttp_execute(&self->parser, at, (size_t)length);
    self->executing = 0;
    PyObject *result = NULL;
    if (self->parser.upgrade == 1 && error == HPE_PAUSED_UPGRADE) {
        Py_ssize_t offset = llhttp_get_error_pos(&self->parser) - at;
        llhttp_resume_after_upgrade(&self->parser);
        PyObject *arg = PyLong_FromSsize_t(offset);
        if (arg != NULL) {
            PyErr_SetObject(HttpParserUpgrade, arg);
            Py_DECREF(arg);
        }
    } else if (error != HPE_OK) {
        raise_error(self);
    } else {
        result = Py_NewRef(Py_None);
    }
    if (owned) {
        PyBuffer_Release(&view);
    }
    Py_DECREF(self);
    return result;
}

static PyObject *get_method(Parser *self, PyObject *unused) {
    unsigned method = self->parser.method;
    if (method >= sizeof(method_names) / sizeof(method_names[0])) {
        return PyBytes_FromString(llhttp_method_name((llhttp_method_t)method));
    }
    if (method_names[method] == NULL) {
        method_names[method] = PyBytes_FromString(llhttp_method_name((llhttp_method_t)method));
        if (method_names[method] == NULL) {
            return NULL;
        }
    }
    return Py_NewRef(method_names[method]);
}

static PyObject *get_http_version(Parser *self, PyObject *unused) {
    if (self->parser.http_major == 1 && self->parser.http_minor == 1) {
        return Py_NewRef(version_1_1);
    }
    if (self->parser.http_major == 1 && self->parser.http_minor == 0) {
        return Py_NewRef(version_1_0);
    }
    return PyUnicode_FromFormat("%d.%d", self->parser.http_major, self->parser.http_minor);
}

static PyObject *should_keep_alive(Parser *self, PyObject *unused) {
    return PyBool_FromLong(llhttp_should_keep_alive(&self->parser));
}

static PyObject *should_upgrade(Parser *self, PyObject *unused) {
    return PyBool_FromLong(self->parser.upgrade);
}

static PyObject *get_status_code(Parser *self, PyObject *unused) {
    return PyLong_FromLong(self->parser.status_code);
}

static PyMethodDef request_methods[] = {
    {"feed_data", (PyCFunction)feed_data, METH_O, "Parses the bytes given."},
    {"get_method", (PyCFunction)get_method, METH_NOARGS, "The request's method (bytes)."},
    {"get_http_version", (PyCFunction)get_http_version, METH_NOARGS, "'1.1', '1.0', ..."},
    {"should_keep_alive", (PyCFunction)should_keep_alive, METH_NOARGS, NULL},
    {"should_upgrade", (PyCFunction)should_upgrade, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyMethodDef response_methods[] = {
    {"feed_data", (PyCFunction)feed_data, METH_O, "Parses the bytes given."},
    {"get_status_code", (PyCFunction)get_status_code, METH_NOARGS, "The response's status."},
    {"get_http_version", (PyCFunction)get_http_version, METH_NOARGS, "'1.1', '1.0', ..."},
    {"should_keep_alive", (PyCFunction)should_keep_alive, METH_NOARGS, NULL},
    {"should_upgrade", (PyCFunction)should_upgrade, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject RequestParserType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "sluice.proxy._http1.RequestParser",
    .tp_basicsize = sizeof(Parser),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "An HTTP/1.1 request parser: RequestParser(protocol, max_url, "
              "max_header_bytes, max_header_count).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)request_init,
    .tp_dealloc = (destructor)parser_dealloc,
    .tp_traverse = (traverseproc)parser_traverse,
    .tp_clear = (inquiry)parser_clear,
    .tp_methods = request_methods,
};

static PyTypeObject ResponseParserType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "sluice.proxy._http1.ResponseParser",
    .tp_basicsize = sizeof(Parser),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "An HTTP/1.1 response parser: ResponseParser(protocol, max_url, "
              "max_header_bytes, max_header_count).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)response_init,
    .tp_dealloc = (destructor)parser_dealloc,
    .tp_traverse = (traverseproc)parser_traverse,
    .tp_clear = (inquiry)parser_clear,
    .tp_methods = response_methods,
};

static void settings_init(llhttp_settings_t *settings, int is_request) {
    llhttp_settings_init(settings);
    settings->on_message_begin = cb_message_begin;
    if (is_request) {
        settings->on_url = cb_url;
        settings->on_url_complete = cb_url_complete;
    }
    settings->on_header_field = cb_header_field;
    settings->on_header_value = cb_header_value;
    settings->on_header_value_complete = cb_header_value_complete;
    settings->on_headers_complete = cb_headers_complete;
    settings->on_body = cb_body;
    settings->on_message_complete = cb_message_complete;
    settings->on_chunk_header = cb_chunk_header;
    settings->on_chunk_complete = cb_chunk_complete;
}

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "sluice.proxy._http1",
    "HTTP/1.1 heads parsed by llhttp with C callbacks (the compiled build's parser).",
    -1,
    NULL,
    NULL,
    NULL,
    NULL,
    NULL,
};

static PyObject *error_class(PyObject *errors, const char *name) {
    return PyObject_GetAttrString(errors, name);
}

PyMODINIT_FUNC PyInit__http1(void) {
    PyObject *errors = PyImport_ImportModule("httptools.parser.errors");
    if (errors == NULL) {
        return NULL;
    }
    HttpParserError = error_class(errors, "HttpParserError");
    HttpParserCallbackError = error_class(errors, "HttpParserCallbackError");
    HttpParserInvalidStatusError = error_class(errors, "HttpParserInvalidStatusError");
    HttpParserInvalidMethodError = error_class(errors, "HttpParserInvalidMethodError");
    HttpParserInvalidURLError = error_class(errors, "HttpParserInvalidURLError");
    HttpParserUpgrade = error_class(errors, "HttpParserUpgrade");
    Py_DECREF(errors);
    if (!HttpParserError || !HttpParserCallbackError || !HttpParserInvalidStatusError ||
        !HttpParserInvalidMethodError || !HttpParserInvalidURLError || !HttpParserUpgrade) {
        return NULL;
    }
    version_1_1 = PyUnicode_InternFromString("1.1");
    version_1_0 = PyUnicode_InternFromString("1.0");
    if (version_1_1 == NULL || version_1_0 == NULL) {
        return NULL;
    }
    settings_init(&request_settings, 1);
    settings_init(&response_settings, 0);
    if (PyType_Ready(&RequestParserType) < 0 || PyType_Ready(&ResponseParserType) < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(module, "RequestParser", (PyObject *)&RequestParserType) < 0 ||
        PyModule_AddObjectRef(module, "ResponseParser", (PyObject *)&ResponseParserType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
