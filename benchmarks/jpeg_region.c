/* A measuring probe for benchmarks/loader.py --region-probe, not part of the library.

   decode(data, top, left, height, width) -> bytearray: the RGB pixels of one region of a JPEG, decoded
   with libjpeg-turbo's partial decoding: rows above the region are skipped (entropy-decoded only,
   jpeg_skip_scanlines), columns outside it are not transformed (jpeg_crop_scanline), and decoding
   stops after its last row. It answers how much a crop-only decoder could save over decoding the
   whole image. The pixels equal a full decode's (loader.py checks it), because the decoded columns
   keep one pixel of margin around the region: the upsampled chroma at the edge of a cropped block
   is not the same as inside the image.

   Built by loader.py with the system's C compiler against libjpeg-turbo's headers. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <jpeglib.h>

typedef struct {
    struct jpeg_error_mgr base;
    jmp_buf escape;
    char text[JMSG_LENGTH_MAX];
} Errors;

static void on_fatal(j_common_ptr cinfo) {
    Errors *errors = (Errors *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, errors->text);
    longjmp(errors->escape, 1);
}

static void on_warning(j_common_ptr cinfo, int level) {
    (void)cinfo;
    (void)level;
}

#define BAND 16 /* rows asked of libjpeg per call */

static PyObject *decode(PyObject *self, PyObject *args) {
    Py_buffer data;
    int top, left, height, width;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*iiii", &data, &top, &left, &height, &width))
        return NULL;
    struct jpeg_decompress_struct cinfo;
    Errors errors;
    PyObject *volatile pixels = NULL;
    unsigned char *volatile band = NULL;
    cinfo.err = jpeg_std_error(&errors.base);
    errors.base.error_exit = on_fatal;
    errors.base.emit_message = on_warning;
    strcpy(errors.text, "out of memory");
    if (setjmp(errors.escape)) {
        jpeg_destroy_decompress(&cinfo);
        free(band);
        Py_XDECREF(pixels);
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, errors.text);
        return NULL;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, (const unsigned char *)data.buf, (unsigned long)data.len);
    jpeg_read_header(&cinfo, TRUE);
    cinfo.out_color_space = JCS_RGB;
    jpeg_start_decompress(&cinfo);
    if (top < 0 || left < 0 || height < 1 || width < 1 || (JDIMENSION)top + height > cinfo.output_height ||
        (JDIMENSION)left + width > cinfo.output_width) {
        strcpy(errors.text, "region outside the image");
        longjmp(errors.escape, 1);
    }
    JDIMENSION first = left > 0 ? (JDIMENSION)left - 1 : 0;
    JDIMENSION end = (JDIMENSION)left + width < cinfo.output_width ? (JDIMENSION)left + width + 1 : cinfo.output_width;
    JDIMENSION x0 = first, decoded = end - first;
    if (decoded < cinfo.output_width)
        jpeg_crop_scanline(&cinfo, &x0, &decoded); /* widens to whole blocks; x0 <= first */
    else
        x0 = 0;
    if (top > 0)
        jpeg_skip_scanlines(&cinfo, (JDIMENSION)top);
    size_t stride = (size_t)cinfo.output_width * 3, shift = (size_t)(left - x0) * 3, row = (size_t)width * 3;
    pixels = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)height * width * 3);
    band = malloc(stride * BAND);
    if (pixels == NULL || band == NULL)
        longjmp(errors.escape, 1);
    unsigned char *out = (unsigned char *)PyByteArray_AS_STRING(pixels);
    JSAMPROW rows[BAND];
    for (int i = 0; i < BAND; i++)
        rows[i] = band + stride * i;
    for (int done = 0; done < height;) {
        int want = height - done < BAND ? height - done : BAND;
        int got = (int)jpeg_read_scanlines(&cinfo, rows, (JDIMENSION)want);
        if (got < 1) {
            strcpy(errors.text, "no rows decoded");
            longjmp(errors.escape, 1);
        }
        for (int i = 0; i < got; i++)
            memcpy(out + (size_t)(done + i) * row, rows[i] + shift, row);
        done += got;
    }
    free(band);
    band = NULL;
    jpeg_abort_decompress(&cinfo); /* the rows below the region are never decoded */
    jpeg_destroy_decompress(&cinfo);
    PyBuffer_Release(&data);
    return pixels;
}

static PyMethodDef methods[] = {
    {"decode", decode, METH_VARARGS, "decode(data, top, left, height, width) -> RGB bytearray of that region"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "jpeg_region", NULL, -1, methods};

PyMODINIT_FUNC PyInit_jpeg_region(void) { return PyModule_Create(&module); }
