/* What LLVM libraries compiled against glibc 2.38 or newer need from glibc that an older one
 * lacks, for linking them on such a system (Debian 12 has 2.36) into a binary that also runs
 * on glibc 2.35 (Ubuntu 22.04, common on GPU machines). scripts/setup-llvm.sh builds this file
 * only where the C library lacks glibc 2.38's symbols.
 *
 * strtol, strtoll and strtoull as C23 defines them, under the names glibc 2.38's headers give
 * them (__isoc23_*). C23 changed one thing: in base 0 or 2, a "0b" or "0B" prefix followed by a
 * binary digit introduces binary digits. Everything else is the older functions' behaviour,
 * which these call.
 *
 * arc4random (glibc 2.36): 32 random bits from the kernel's generator, as glibc's is. */
#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/random.h>

uint32_t arc4random(void) {
    uint32_t value;
    /* getrandom blocks until the generator is seeded and returns short only when a signal
     * interrupts it. */
    while (getrandom(&value, sizeof value, 0) != (ssize_t)sizeof value) {
    }
    return value;
}

/* Where the binary digits begin when nptr has C23's binary prefix in base 0 or 2; NULL
 * otherwise. Sets *negative from the sign. */
static const char *binary_digits(const char *nptr, int base, int *negative) {
    const char *s = nptr;
    if (base != 0 && base != 2) {
        return NULL;
    }
    while (isspace((unsigned char)*s)) {
        s++;
    }
    *negative = *s == '-';
    if (*s == '+' || *s == '-') {
        s++;
    }
    if (s[0] == '0' && (s[1] == 'b' || s[1] == 'B') && (s[2] == '0' || s[2] == '1')) {
        return s + 2;
    }
    return NULL;
}

/* The binary digits' value; *overflow when it exceeds unsigned long long. */
static unsigned long long binary_magnitude(const char *digits, char **endptr, int *overflow) {
    int saved = errno;
    errno = 0;
    unsigned long long value = strtoull(digits, endptr, 2);
    *overflow = errno == ERANGE;
    errno = saved;
    return value;
}

unsigned long long __isoc23_strtoull(const char *nptr, char **endptr, int base) {
    int negative, overflow;
    const char *digits = binary_digits(nptr, base, &negative);
    if (digits == NULL) {
        return strtoull(nptr, endptr, base);
    }
    unsigned long long value = binary_magnitude(digits, endptr, &overflow);
    if (overflow) {
        errno = ERANGE;
        return ULLONG_MAX;
    }
    /* As strtoull does: a negative value is negated in unsigned arithmetic. */
    return negative ? 0ULL - value : value;
}

/* A signed result within [minimum, maximum], saturating with ERANGE as strtol does. */
static long long signed_binary(const char *digits, char **endptr, int negative,
                               long long minimum, long long maximum) {
    int overflow;
    unsigned long long value = binary_magnitude(digits, endptr, &overflow);
    unsigned long long limit =
        negative ? (unsigned long long)maximum + 1ULL : (unsigned long long)maximum;
    if (overflow || value > limit) {
        errno = ERANGE;
        return negative ? minimum : maximum;
    }
    if (!negative) {
        return (long long)value;
    }
    return value == limit ? minimum : -(long long)value;
}

long long __isoc23_strtoll(const char *nptr, char **endptr, int base) {
    int negative;
    const char *digits = binary_digits(nptr, base, &negative);
    if (digits == NULL) {
        return strtoll(nptr, endptr, base);
    }
    return signed_binary(digits, endptr, negative, LLONG_MIN, LLONG_MAX);
}

long __isoc23_strtol(const char *nptr, char **endptr, int base) {
    int negative;
    const char *digits = binary_digits(nptr, base, &negative);
    if (digits == NULL) {
        return strtol(nptr, endptr, base);
    }
    return (long)signed_binary(digits, endptr, negative, LONG_MIN, LONG_MAX);
}
