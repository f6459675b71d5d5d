using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using System.Reflection;
using System.Xml.Linq;
using Xunit;

namespace SwitchNorm.CSharp.Tests
{
    /// <summary>
    /// Every public type of both packages, every public member of the C# facade, every function of an F# module and
    /// every member declared by a public F# class has XML documentation (what the API site is made of).
    /// </summary>
    public class XmlDocTests
    {
        private static HashSet<string> Documented(Assembly a)
        {
            var xml = Path.ChangeExtension(a.Location, ".xml");
            Assert.True(File.Exists(xml), $"no XML documentation next to {a.Location}");
            return XDocument.Load(xml).Descendants("member")
                .Where(m => m.Elements().Any(e => e.Name == "summary" && e.Value.Trim().Length > 0))
                .Select(m => (string)m.Attribute("name")!)
                .ToHashSet();
        }

        private static string Id(Type t) => (t.FullName ?? t.Name).Replace('+', '.');

        private static string Params(MethodBase m)
        {
            var ps = m.GetParameters();
            return ps.Length == 0 ? "" : "(" + string.Join(",", ps.Select(p => Id(p.ParameterType).Split('`')[0])) + ")";
        }

        private static bool IsFSharpModule(Type t) =>
            t.GetCustomAttributesData().Any(a => a.AttributeType.Name == "CompilationMappingAttribute"
                && a.ConstructorArguments.Count > 0 && a.ConstructorArguments[0].Value is int flags && (flags & 31) == 7);

        private static bool IsRecordOrUnion(Type t) =>
            t.GetCustomAttributesData().Any(a => a.AttributeType.Name == "CompilationMappingAttribute"
                && a.ConstructorArguments.Count > 0 && a.ConstructorArguments[0].Value is int flags && ((flags & 31) == 1 || (flags & 31) == 2));

        [Fact]
        public void Every_public_type_and_member_has_a_summary()
        {
            var missing = new List<string>();
            int checkedMembers = 0;
            foreach (var a in new[] { typeof(SwitchNorm2d).Assembly, typeof(Layers).Assembly })
            {
                var docs = Documented(a);
                bool has(string prefix, string name) => docs.Any(d => d.StartsWith(prefix + name));
                foreach (var t in a.GetExportedTypes().Where(t => !t.IsNested || t.DeclaringType!.IsPublic))
                {
                    if (t.Name.Contains('@') || t.Name.StartsWith("<")) continue;
                    // a union's case classes and Tags are compiler-made; the cases are documented on the union
                    if (t.IsNested && IsRecordOrUnion(t.DeclaringType!)) continue;
                    if (!docs.Contains("T:" + Id(t))) missing.Add("type " + Id(t));
                    bool csharp = a == typeof(Layers).Assembly;
                    if (IsRecordOrUnion(t) || typeof(Delegate).IsAssignableFrom(t) || t.IsEnum) continue;
                    if (!(csharp || IsFSharpModule(t) || t.IsClass)) continue;
                    var flags = BindingFlags.Public | BindingFlags.Instance | BindingFlags.Static | BindingFlags.DeclaredOnly;
                    foreach (var m in t.GetMethods(flags).Where(m => !m.IsSpecialName && !m.Name.Contains('@')))
                    {
                        if (m.GetBaseDefinition() != m) continue; // overrides inherit TorchSharp's documentation
                        checkedMembers++;
                        if (!has("M:", Id(t) + "." + m.Name)) missing.Add($"method {Id(t)}.{m.Name}");
                    }
                    foreach (var p in t.GetProperties(flags))
                    {
                        var acc = p.GetMethod ?? p.SetMethod;
                        if (acc != null && acc.GetBaseDefinition() != acc) continue;
                        if (!has("P:", Id(t) + "." + p.Name)) missing.Add($"property {Id(t)}.{p.Name}");
                    }
                }
            }
            // the walk reaches the modules' functions and the classes' members, not just the types
            Assert.True(checkedMembers > 80, $"only {checkedMembers} methods checked");
            Assert.True(missing.Count == 0, "undocumented: " + string.Join("; ", missing.Distinct()));
        }
    }
}
