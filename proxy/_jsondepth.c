/* A request body's nesting depth checked in C: the compiled build's `nesting_exceeds`.

    exceeds(raw: bytes, limit: int) -> bool

Whether `raw` nests arrays and objects deeper than `limit`, brackets inside JSON strings
not counted: what proxy/jsonbody.py's `nesting_exceeds` says for any bytes (a string
left open runs to the end, a backslash escapes the byte after it; stray closers lower the
count), which tests/proxy/test_chunk_bookkeeping.py holds both to. The pure build's
version costs ~2,700 instructions for a short chat body (a latin-1 copy and two
`str.count` calls, ~5 instructions a byte); here the opening brackets are counted with
memchr, and a body with no more of them than `limit` (every ordinary one) is done. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

static Py_ssize_t count_of(const char *data, Py_ssize_t size, char byte)
{
    Py_ssize_t count = 0;
    const char *end = data + size;
    const char *at = data;
    while (at < end && (at = memchr(at, byte, (size_t)(end - at))) != NULL) {
        count++;
        at++;
    }
    return count;
}

/* The deepest count, scanning byte by byte: only for a body with many brackets. */
static int deeper_than(const char *data, Py_ssize_t size, long long limit)
{
    long long depth = 0;
    for (Py_ssize_t i = 0; i < size; i++) {
        char c = data[i];
        if (c == '[' || c == '{') {
            if (++depth > limit)
                return 1;
        } else if (c == ']' || c == '}') {
            depth--;
        } else if (c == '"') {
            for (i++; i < size; i++) {
                if (data[i] == '\\')
                    i++; /* the escaped byte, whatever it is */
                else if (data[i] == '"')
                    break;
            }
        }
    }
    return 0;
}

static PyObject *exceeds(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "exceeds(raw: bytes, limit: int)");
        return NULL;
    }
    int overflow;
    long long limit = PyLong_AsLongLongAndOverflow(args[1], &overflow);
    if (limit == -1 && PyErr_Occurred())
        return NULL;
    if (overflow > 0)
        Py_RETURN_FALSE; /* past 64 bits: more than any body's brackets */
    if (overflow < 0 || limit < 0)
        Py_RETURN_TRUE; /* a depth is never below 0 */
    const char *data = PyBytes_AS_STRING(args[0]);
    Py_ssize_t size = PyBytes_GET_SIZE(args[0]);
    if (count_of(data, size, '[') + count_of(data, size, '{') <= limit)
        Py_RETURN_FALSE;
    if (deeper_than(data, size, limit))
        Py_RETURN_TRUE;
    Py_RETURN_FALSE;
}

static PyMethodDef methods[] = {
    {"exceeds", (PyCFunction)(void (*)(void))exceeds, METH_FASTCALL,
     "exceeds(raw, limit): whether raw nests arrays and objects deeper than limit."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_jsondepth",
    .m_doc = "A request body's nesting depth checked in C.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__jsondepth(void)
{
    return PyModule_Create(&module_def);
}
