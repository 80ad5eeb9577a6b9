/* SHA-256 digests of many rows, each of some of its parts, in one call (issue #17).

   Why: a joiner hashes two digests per snapshot record (its id, from its parent and name,
   and its Merkle leaf, from its kind, name, stamp and body), both cut from the record's
   row. Through hashlib each costs a call that allocates an OpenSSL context, copies it to
   read the digest and wipes both (about 250 ns; the hashing itself, with the CPU's SHA
   instructions, is a tenth of that), and the bytes to hash are first cut and joined into
   a new object: together about half of the CPU a joiner's event loop spends per record.
   Here a page's digests are made in one call: each row's parts go straight from the row
   into OpenSSL's low-level SHA-256 (its context on the stack), nothing allocated but the
   digest.

   `digests(rows, parts)`: for each row, the SHA-256 of the concatenation of `parts`, each
   either bytes (themselves) or `(start, end)`: `row[start:end]` as Python slices it
   (`end` -1: to the row's end; out of range clamps). The same digests as
   `sha256(b"".join(...)).digest()`, which `tests/crdt/test_digests.py` holds it to.

   OpenSSL is the one Python's own `_hashlib` loaded: `bind(path)` takes the path of that
   module and finds SHA256_Init, _Update and _Final among what it links (no OpenSSL headers
   are needed to build this), and `trionode.crdt.digests` checks the bound function's
   answers before using it. Without this extension (no compiler when installing) the same
   digests come from hashlib. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <string.h>

enum {
    DIGEST = 32,
    MAX_PARTS = 8,
};

/* OpenSSL's low-level SHA-256 (its one-shot SHA256 looks the algorithm up on every call
   since OpenSSL 3). Its SHA256_CTX (112 bytes in every OpenSSL) is kept in `struct ctx`,
   larger and aligned, as OpenSSL's headers are not needed to build this. */
struct ctx {
    unsigned long long words[32];
};
static int (*sha256_init)(struct ctx *);
static int (*sha256_update)(struct ctx *, const void *, size_t);
static int (*sha256_final)(unsigned char *, struct ctx *);

struct part {
    const char *bytes; /* a constant part, or NULL for a slice of the row */
    Py_ssize_t size;
    Py_ssize_t start, end; /* the slice (end -1: to the row's end) */
};

static PyObject *
bind(PyObject *self, PyObject *args)
{
    const char *path;
    if (!PyArg_ParseTuple(args, "s", &path)) {
        return NULL;
    }
    /* (Already loaded by Python: RTLD_NOLOAD opens it again without loading anything.) */
    void *library = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    if (library == NULL) {
        PyErr_Format(PyExc_OSError, "%s is not loaded", path);
        return NULL;
    }
    void *init = dlsym(library, "SHA256_Init");
    void *update = dlsym(library, "SHA256_Update");
    void *final = dlsym(library, "SHA256_Final");
    if (init == NULL || update == NULL || final == NULL) {
        PyErr_Format(PyExc_OSError, "%s links no SHA256_Init, _Update and _Final", path);
        return NULL;
    }
    sha256_init = (int (*)(struct ctx *))init;
    sha256_update = (int (*)(struct ctx *, const void *, size_t))update;
    sha256_final = (int (*)(unsigned char *, struct ctx *))final;
    Py_RETURN_NONE;
}

/* Read `parts` into `out`; the number of parts, or -1 with an exception set. The constant
   parts' bytes are borrowed from `spec`, which the caller holds. */
static int
read_parts(PyObject *spec, struct part *out)
{
    if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) > MAX_PARTS) {
        PyErr_SetString(PyExc_TypeError, "parts must be a tuple of up to 8 parts");
        return -1;
    }
    Py_ssize_t count = PyTuple_GET_SIZE(spec);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item = PyTuple_GET_ITEM(spec, i);
        if (PyBytes_Check(item)) {
            out[i].bytes = PyBytes_AS_STRING(item);
            out[i].size = PyBytes_GET_SIZE(item);
            continue;
        }
        Py_ssize_t start, end;
        if (!PyTuple_Check(item) || !PyArg_ParseTuple(item, "nn", &start, &end)) {
            PyErr_Clear();
            PyErr_SetString(PyExc_TypeError, "a part is bytes or (start, end)");
            return -1;
        }
        if (start < 0 || end < -1) {
            PyErr_SetString(PyExc_ValueError, "a slice's start is >= 0, its end >= -1");
            return -1;
        }
        out[i].bytes = NULL;
        out[i].start = start;
        out[i].end = end;
    }
    return (int)count;
}

static PyObject *
digests(PyObject *self, PyObject *args)
{
    PyObject *rows_in, *spec;
    struct part parts[MAX_PARTS];
    if (!PyArg_ParseTuple(args, "OO", &rows_in, &spec)) {
        return NULL;
    }
    if (sha256_final == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "not bound to OpenSSL (bind)");
        return NULL;
    }
    int count = read_parts(spec, parts);
    if (count < 0) {
        return NULL;
    }
    PyObject *rows = PySequence_Fast(rows_in, "rows must be a sequence");
    if (rows == NULL) {
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(rows);
    PyObject **items = PySequence_Fast_ITEMS(rows);
    PyObject *result = PyList_New(n);
    if (result == NULL) {
        goto fail;
    }
    for (Py_ssize_t r = 0; r < n; r++) {
        PyObject *row = items[r];
        if (!PyBytes_Check(row)) {
            PyErr_SetString(PyExc_TypeError, "rows must be bytes");
            goto fail;
        }
        const char *data = PyBytes_AS_STRING(row);
        Py_ssize_t length = PyBytes_GET_SIZE(row);
        struct ctx ctx;
        sha256_init(&ctx);
        for (int i = 0; i < count; i++) {
            if (parts[i].bytes != NULL) {
                sha256_update(&ctx, parts[i].bytes, (size_t)parts[i].size);
            } else {
                Py_ssize_t start = parts[i].start < length ? parts[i].start : length;
                Py_ssize_t end = parts[i].end < 0 || parts[i].end > length ? length : parts[i].end;
                if (end > start) {
                    sha256_update(&ctx, data + start, (size_t)(end - start));
                }
            }
        }
        PyObject *digest = PyBytes_FromStringAndSize(NULL, DIGEST);
        if (digest == NULL) {
            goto fail;
        }
        sha256_final((unsigned char *)PyBytes_AS_STRING(digest), &ctx);
        PyList_SET_ITEM(result, r, digest);
    }
    Py_DECREF(rows);
    return result;
fail:
    Py_DECREF(rows);
    Py_XDECREF(result);
    return NULL;
}

static PyMethodDef methods[] = {
    {"bind", bind, METH_VARARGS, "Bind to the OpenSSL that the module at this path links."},
    {"digests", digests, METH_VARARGS, "The SHA-256 of each row's parts, joined."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "_digests",
    .m_doc = "SHA-256 digests of many rows' parts in one call.",
    .m_size = -1,
    .m_methods = methods,
};

/* The calling convention of this build (bind, digests): `digests.py` uses a module only
   of the convention it was written for, so a build left over from an older source falls
   back to hashlib instead of failing its calls. */
#define INTERFACE 1

PyMODINIT_FUNC
PyInit__digests(void)
{
    PyObject *made = PyModule_Create(&module);
    if (made != NULL && PyModule_AddIntConstant(made, "INTERFACE", INTERFACE) < 0) {
        Py_DECREF(made);
        return NULL;
    }
    return made;
}
