/* Checks scripts/glibc-compat.c: C23's rules (values worked out by hand) and random draws;
 * scripts/setup-llvm.sh runs it before it installs the compatibility library. */
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>

long __isoc23_strtol(const char *, char **, int);
long long __isoc23_strtoll(const char *, char **, int);
unsigned long long __isoc23_strtoull(const char *, char **, int);
uint32_t arc4random(void);

static int failures = 0;

#define EXPECT(expression, expected)                                                          \
    do {                                                                                      \
        long long actual = (long long)(expression);                                           \
        if (actual != (long long)(expected)) {                                                \
            printf("%s is %lld, expected %lld\n", #expression, actual, (long long)(expected)); \
            failures++;                                                                       \
        }                                                                                     \
    } while (0)

#define TWO_TO_THE_64 "10000000000000000000000000000000000000000000000000000000000000000"
#define TWO_TO_THE_63 "1000000000000000000000000000000000000000000000000000000000000000"

int main(void) {
    char *end;
    EXPECT(__isoc23_strtol("0b101", &end, 0), 5);
    EXPECT(*end, '\0');
    EXPECT(__isoc23_strtol("  -0B11x", &end, 2), -3);
    EXPECT(*end, 'x');
    /* No binary digit after the prefix: the 0 is the number. */
    EXPECT(__isoc23_strtol("0b2", &end, 0), 0);
    EXPECT(*end, 'b');
    EXPECT(__isoc23_strtol("0x1f", &end, 0), 31);
    /* In base 16, b is a digit. */
    EXPECT(__isoc23_strtol("0b101", &end, 16), 0xb101);
    EXPECT(__isoc23_strtol("42", &end, 10), 42);
    errno = 0;
    EXPECT(__isoc23_strtol("0b" TWO_TO_THE_63, &end, 0), LONG_MAX);
    EXPECT(errno, ERANGE);
    errno = 0;
    EXPECT(__isoc23_strtol("-0b" TWO_TO_THE_63, &end, 0), LONG_MIN);
    EXPECT(errno, 0);
    errno = 0;
    EXPECT(__isoc23_strtoll("-0b" TWO_TO_THE_64, &end, 0), LLONG_MIN);
    EXPECT(errno, ERANGE);
    EXPECT(__isoc23_strtoull("-0b1", &end, 0), -1);
    errno = 0;
    EXPECT(__isoc23_strtoull("0b" TWO_TO_THE_64, &end, 0), ULLONG_MAX);
    EXPECT(errno, ERANGE);
    /* Four equal draws of 32 random bits happen once in 2^96 runs. */
    uint32_t first = arc4random();
    int all_equal = 1;
    for (int draw = 0; draw < 3; draw++) {
        all_equal &= arc4random() == first;
    }
    EXPECT(all_equal, 0);
    return failures != 0;
}
