/* HTTP/1.1 message heads joined in C: the compiled build's `headjoin.join_head`.

    join(leading: tuple[bytes, ...], headers: list[tuple[bytes, bytes]],
         content_length: int, trailing: bytes) -> bytes

writes the leading parts (a status or request line, a prefix of fixed headers), then
`name: value\r\n` for each header, then `content-length: N\r\n` when content_length is
0 or more, then `trailing` and the blank line's CRLF: the bytes proxy/headjoin.py's
Python version joins (tests/proxy/test_headjoin.py holds the two to the same bytes).
That version appends four parts a header to a list and joins it: ~5,300 instructions
for a response head of five headers and ~3,600 for the backend's request head, compiled,
most of them in bytes.join taking a buffer of each part and in `%d` of the length. Here
each part is copied once into one buffer. The values are sluice's own or already checked
(no CR or LF: proxy/headers.py); nothing is checked again here. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

static int check_bytes(PyObject *part)
{
    if (PyBytes_Check(part))
        return 0;
    PyErr_Format(PyExc_TypeError, "a head's part must be bytes, not %.100s", Py_TYPE(part)->tp_name);
    return -1;
}

static PyObject *join(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyTuple_Check(args[0]) || !PyList_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "join(leading: tuple, headers: list, content_length: int, trailing: bytes)");
        return NULL;
    }
    PyObject *leading = args[0];
    PyObject *headers = args[1];
    /* A length past 64 bits is refused (OverflowError): sluice's are capped long before. */
    long long length = PyLong_AsLongLong(args[2]);
    if (length == -1 && PyErr_Occurred())
        return NULL;
    PyObject *trailing = args[3];
    if (check_bytes(trailing) < 0)
        return NULL;

    /* The size first: one allocation, one copy of each part. */
    Py_ssize_t size = PyBytes_GET_SIZE(trailing) + 2 + (length >= 0 ? 40 : 0);
    Py_ssize_t n_leading = PyTuple_GET_SIZE(leading);
    for (Py_ssize_t i = 0; i < n_leading; i++) {
        PyObject *part = PyTuple_GET_ITEM(leading, i);
        if (check_bytes(part) < 0)
            return NULL;
        size += PyBytes_GET_SIZE(part);
    }
    Py_ssize_t n_headers = PyList_GET_SIZE(headers);
    for (Py_ssize_t i = 0; i < n_headers; i++) {
        PyObject *header = PyList_GET_ITEM(headers, i);
        if (!PyTuple_Check(header) || PyTuple_GET_SIZE(header) != 2) {
            PyErr_SetString(PyExc_TypeError, "a header must be a (name, value) tuple");
            return NULL;
        }
        PyObject *name = PyTuple_GET_ITEM(header, 0);
        PyObject *value = PyTuple_GET_ITEM(header, 1);
        if (check_bytes(name) < 0 || check_bytes(value) < 0)
            return NULL;
        size += PyBytes_GET_SIZE(name) + PyBytes_GET_SIZE(value) + 4;
    }
    PyObject *head = PyBytes_FromStringAndSize(NULL, size);
    if (head == NULL)
        return NULL;
    char *w = PyBytes_AS_STRING(head);
    for (Py_ssize_t i = 0; i < n_leading; i++) {
        PyObject *part = PyTuple_GET_ITEM(leading, i);
        memcpy(w, PyBytes_AS_STRING(part), (size_t)PyBytes_GET_SIZE(part));
        w += PyBytes_GET_SIZE(part);
    }
    /* The list is not changed meanwhile: nothing above runs Python code. */
    for (Py_ssize_t i = 0; i < n_headers; i++) {
        PyObject *header = PyList_GET_ITEM(headers, i);
        PyObject *name = PyTuple_GET_ITEM(header, 0);
        PyObject *value = PyTuple_GET_ITEM(header, 1);
        memcpy(w, PyBytes_AS_STRING(name), (size_t)PyBytes_GET_SIZE(name));
        w += PyBytes_GET_SIZE(name);
        *w++ = ':';
        *w++ = ' ';
        memcpy(w, PyBytes_AS_STRING(value), (size_t)PyBytes_GET_SIZE(value));
        w += PyBytes_GET_SIZE(value);
        *w++ = '\r';
        *w++ = '\n';
    }
    if (length >= 0) {
        memcpy(w, "content-length: ", 16);
        w += 16;
        char reversed[20];
        int len = 0;
        unsigned long long n = (unsigned long long)length;
        do {
            reversed[len++] = (char)('0' + n % 10);
            n /= 10;
        } while (n != 0);
        while (len > 0)
            *w++ = reversed[--len];
        *w++ = '\r';
        *w++ = '\n';
    }
    memcpy(w, PyBytes_AS_STRING(trailing), (size_t)PyBytes_GET_SIZE(trailing));
    w += PyBytes_GET_SIZE(trailing);
    *w++ = '\r';
    *w++ = '\n';
    Py_ssize_t written = w - PyBytes_AS_STRING(head);
    if (written != size && _PyBytes_Resize(&head, written) < 0)
        return NULL;
    return head;
}

static PyMethodDef methods[] = {
    {"join", (PyCFunction)(void (*)(void))join, METH_FASTCALL,
     "join(leading, headers, content_length, trailing): an HTTP/1.1 head's bytes."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_headjoin",
    .m_doc = "HTTP/1.1 message heads joined in C.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__headjoin(void)
{
    return PyModule_Create(&module_def);
}
